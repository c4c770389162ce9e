"""Building the contracts: `forge build` over contracts/src with foundry.toml's settings (solc-js behind
bin/solc, no compiler download). `make` runs it once; the devnet runs it again before it deploys, which costs
nothing when the sources have not changed (forge keeps a cache) and keeps a freshly edited contract from being
deployed stale. Nothing at run time compiles: see :mod:`settlement.artifacts`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from marketplace.devnet.process import foundry_tool
from settlement.config import PROJECT_ROOT
from settlement.errors import CompilerError

BUILD_TIMEOUT_S = 600.0


def build_contracts(root: Path = PROJECT_ROOT) -> None:
    """Compiles what changed since the last build; raises CompilerError with forge's message if it fails."""
    try:
        result = subprocess.run(
            [str(foundry_tool("forge", root)), "build", "--root", str(root), "--skip", "test"],
            cwd=root,  # foundry.toml names bin/solc relative to the root
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CompilerError(f"forge build took more than {BUILD_TIMEOUT_S:.0f} s") from exc
    if result.returncode != 0:
        raise CompilerError(f"compilation failed:\n{(result.stderr or result.stdout).strip()[-4000:]}")
