"""The adversarial suite as a figure: every attack in marketplace.testing.adversary, run against real provider
processes (honest and rogue), the gateway's coordinator and app, and anvil.

    attacks        how many were tried
    on_the_ring    of them, how many ran their jobs on the token ring (the gateway's default, HOP_RING)
    on_the_chain   of them, how many on the request/reply chain (HOP_RING=false)
    succeeded      how many got what they were after (target 0)
    honest_harmed  how many blamed, suspended, underpaid or slowed an honest party (target 0)

The last line is one JSON object; the lines before it say what each attack ran into.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from marketplace.testing.adversary import ATTACKS, ON_THE_CHAIN, ON_THE_RING, arena


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args()
    hf_logging.disable_progress_bar()
    verdicts = []
    with tempfile.TemporaryDirectory() as workdir, arena(Path(workdir)) as field:
        for name, attack in ATTACKS.items():
            verdict = attack(field)
            verdicts.append(verdict)
            outcome = "SUCCEEDED" if verdict.succeeded else "failed"
            harm = ", HARMED an honest party" if verdict.honest_harmed else ""
            print(f"{name}: {outcome}{harm} ({verdict.detail})", flush=True)
    print(
        json.dumps(
            {
                "attacks": len(verdicts),
                "on_the_ring": len(ON_THE_RING & set(ATTACKS)),
                "on_the_chain": len(ON_THE_CHAIN & set(ATTACKS)),
                "succeeded": sum(v.succeeded for v in verdicts),
                "honest_harmed": sum(v.honest_harmed for v in verdicts),
            }
        )
    )


if __name__ == "__main__":
    main()
