"""The contracts' ABIs and bytecode, read from the artifacts `forge build` writes (the ``out`` directory of
foundry.toml, build/forge/out). They are built once, by `make` or by the devnet before it first deploys, and
only read here: a running gateway, settlement worker or provider never compiles, and the bytecode Python
deploys is the bytecode `forge test` tested.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from settlement.config import PROJECT_ROOT
from settlement.errors import ContractsNotBuilt

CONTRACT_NAMES = (
    "PaymentToken",
    "StakeManager",
    "VoucherEscrow",
    "PayoutDistributor",
    "BatchSettlement",
    "ERC3009DepositCollector",
)


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str  # 0x-prefixed creation code

    @property
    def abi_hash(self) -> str:
        canonical = json.dumps(self.abi, sort_keys=True, separators=(",", ":"))
        return "0x" + hashlib.sha256(canonical.encode()).hexdigest()


def artifacts_dir(root: Path = PROJECT_ROOT) -> Path:
    """Where forge writes its artifacts, as foundry.toml says."""
    profile = tomllib.loads((root / "foundry.toml").read_text())["profile"]["default"]
    return root / str(profile["out"])


def load_artifacts(out_dir: Path | None = None) -> dict[str, Artifact]:
    """The deployable contracts by name, from forge's artifacts in ``out_dir`` (default: this checkout's)."""
    return dict(_load(out_dir or artifacts_dir()))


@functools.cache
def _load(out_dir: Path) -> tuple[tuple[str, Artifact], ...]:
    artifacts = []
    for name in CONTRACT_NAMES:
        path = out_dir / f"{name}.sol" / f"{name}.json"
        try:
            data = json.loads(path.read_text())
            artifact = Artifact(name, data["abi"], data["bytecode"]["object"])
        except FileNotFoundError as exc:
            raise ContractsNotBuilt(
                f"no build artifact for {name} at {path}: build the contracts with `make contracts` "
                "(or `forge build`)"
            ) from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ContractsNotBuilt(
                f"{path} is not a forge artifact: {exc!r}; rebuild with `make contracts`"
            ) from exc
        if not artifact.bytecode.startswith("0x") or len(artifact.bytecode) <= 2:
            raise ContractsNotBuilt(f"{path} holds no bytecode; rebuild with `make contracts`")
        artifacts.append((name, artifact))
    return tuple(artifacts)
