"""Compiling the contracts with py-solc-x, through a native solc or the solc-js shim in bin/.

Compiler settings (optimizer, EVM version, remappings) come from foundry.toml, so the bytecode deployed from
Python is the bytecode forge tests. Outputs are cached under build/ by a hash of the compiler input.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import solcx
from solcx.exceptions import SolcError
from solcx.wrapper import get_solc_version

from settlement.errors import CompilerError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONTRACT_NAMES = ("PaymentToken", "StakeManager", "VoucherEscrow", "PayoutDistributor")


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str

    @property
    def abi_hash(self) -> str:
        canonical = json.dumps(self.abi, sort_keys=True, separators=(",", ":"))
        return "0x" + hashlib.sha256(canonical.encode()).hexdigest()


def find_solc(root: Path = PROJECT_ROOT) -> Path:
    """A native solc on PATH if there is one, else the solc-js shim (which needs `npm ci` to have run)."""
    shim = root / "bin" / "solc"
    native = shutil.which("solc")
    if native and Path(native).resolve() != shim.resolve():
        return Path(native)
    if not (root / "node_modules" / "solc").is_dir():
        raise CompilerError(
            f"no solc on PATH and no solc-js in {root / 'node_modules'}: run `npm ci` (or `make`)"
        )
    return shim


def compiler_input(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    profile = tomllib.loads((root / "foundry.toml").read_text())["profile"]["default"]
    src = root / profile["src"]
    sources = {
        path.relative_to(root).as_posix(): {"content": path.read_text()}
        for path in sorted(src.rglob("*.sol"))
    }
    return {
        "language": "Solidity",
        "sources": sources,
        "settings": {
            "optimizer": {"enabled": profile["optimizer"], "runs": profile["optimizer_runs"]},
            "evmVersion": profile["evm_version"],
            "remappings": profile["remappings"],
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
        },
    }


def compile_contracts(root: Path = PROJECT_ROOT, cache_dir: Path | None = None) -> dict[str, Artifact]:
    """Compiles contracts/src and returns the deployable contracts by name."""
    solc = find_solc(root)
    data = compiler_input(root)
    key = hashlib.sha256(
        json.dumps(data, sort_keys=True).encode() + _solc_version(solc).encode()
    ).hexdigest()[:16]
    cache = (cache_dir or root / "build" / "artifacts") / f"{key}.json"
    if cache.exists():
        output = json.loads(cache.read_text())
    else:
        try:
            output = solcx.compile_standard(data, base_path=str(root), solc_binary=str(solc))
        except SolcError as exc:
            raise CompilerError(f"compilation failed:\n{exc}") from exc
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(output))
    artifacts: dict[str, Artifact] = {}
    for contracts in output["contracts"].values():
        for name, compiled in contracts.items():
            if name in CONTRACT_NAMES:
                artifacts[name] = Artifact(
                    name, compiled["abi"], "0x" + compiled["evm"]["bytecode"]["object"]
                )
    missing = set(CONTRACT_NAMES) - artifacts.keys()
    if missing:
        raise CompilerError(f"compiler output lacks {sorted(missing)}")
    return artifacts


def _solc_version(solc: Path) -> str:
    try:
        return str(get_solc_version(solc, with_commit_hash=True))
    except (OSError, SolcError, ValueError) as exc:
        raise CompilerError(f"`{solc} --version` failed: {exc}") from exc
