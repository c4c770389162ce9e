"""The demo market `strata up` runs: who plays which role, the tiny model, and each provider's span and price.

Every role is one of anvil's development accounts (their keys are public: never use them on a real network).
The gateway has a key of its own: it signs job tickets and submits exact payments, while the operator's key
(redeeming, posting roots, forwarding) belongs to the settlement worker; one key in two processes would race
for nonces.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from settlement.deploy import ONE_TOKEN

ROLES = (
    "admin", "operator", "treasury", "validator", "gateway",
    "provider-1", "provider-2", "provider-3",
    "client-1", "client-2", "client-3",
    "cheater-1", "cheater-2", "cheater-3",
)  # fmt: skip
FUNDED_ROLES = ("provider", "client", "validator", "cheater")  # prefixes of the roles given FUNDING each
FUNDING = 10_000 * ONE_TOKEN

MODEL_NAME = "tiny"


@dataclass(frozen=True)
class TinyModel:
    """The demo model: small enough that three CPU processes serve it in real time."""

    arch: str = "llama"
    layers: int = 6
    hidden: int = 128  # hidden size; two attention heads of 64
    seed: int = 3  # of the random initialisation, so every build has the same weights and root


TINY_MODEL = TinyModel()
TINY_MARKER = "strata-tiny.json"  # the config a checkpoint was built with, to know when to rebuild it
# Base units of the token per million token-layers: 100, 150 and 200 base units per token-layer, so a
# token through all six layers costs 900 base units (0.0009 sUSD).
PROVIDER_PRICES = (100_000_000, 150_000_000, 200_000_000)
PROVIDER_ROLES = ("provider-1", "provider-2", "provider-3")
# --cheaters: cheater-N serves the N-th span dishonestly, 10% under the honest price so that it wins the work.
CHEATER_ROLES = ("cheater-1", "cheater-2", "cheater-3")
CHEATER_DISCOUNT = 0.9


@dataclass(frozen=True)
class Offer:
    """One demo provider: its role, span and price (base units per million token-layers)."""

    role: str
    start: int
    end: int
    price: int

    @property
    def layers(self) -> str:
        return f"{self.start}:{self.end}"

    @property
    def cheats(self) -> bool:
        return self.role in CHEATER_ROLES


def spans(layers: int, parts: int) -> list[tuple[int, int]]:
    """``layers`` split into ``parts`` contiguous spans, the later ones a layer longer when it does not divide."""
    bounds = [layers * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def offers(layers: int, cheaters: int = 0) -> list[Offer]:
    """The honest providers, a third of the layers each at rising prices; then the cheaters, each under the
    honest price of its span."""
    thirds = spans(layers, len(PROVIDER_ROLES))
    honest = [
        Offer(role, start, end, price)
        for role, (start, end), price in zip(PROVIDER_ROLES, thirds, PROVIDER_PRICES, strict=True)
    ]
    cheating = [
        Offer(role, *thirds[i], int(PROVIDER_PRICES[i] * CHEATER_DISCOUNT))
        for i, role in enumerate(CHEATER_ROLES[:cheaters])
    ]
    return [*honest, *cheating]


def tiny_model(directory: Path) -> tuple[Path, bool]:
    """The demo checkpoint, built once: reused while its marker says it was built from TINY_MODEL. Returns the
    directory and whether it was built now."""
    marker = directory / TINY_MARKER
    try:
        built = json.loads(marker.read_text())
        if built == asdict(TINY_MODEL) and (directory / "config.json").is_file():
            return directory, False
    except (OSError, ValueError):
        pass
    from worker.testing.tiny import write_tiny_checkpoint  # torch: imported only when a model is built

    shutil.rmtree(directory, ignore_errors=True)
    write_tiny_checkpoint(directory, **asdict(TINY_MODEL))
    marker.write_text(json.dumps(asdict(TINY_MODEL)) + "\n")
    return directory, True
