"""Building the contracts: the solc-js shim behaves like native solc for what forge asks of it, and the devnet's
build driver reports a source that does not compile."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from marketplace.devnet.contracts import build_contracts
from settlement.config import PROJECT_ROOT
from settlement.errors import CompilerError

SHIM = PROJECT_ROOT / "bin" / "solc"


def run_shim(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # STRATA_SOLC_JS forces the solc-js path even where a native solc is installed.
    env = {"PATH": "/usr/bin:/bin", "STRATA_SOLC_JS": "1"}
    return subprocess.run(
        [str(SHIM), *args], input=stdin, capture_output=True, text=True, env=env, check=False
    )


def test_version_looks_native() -> None:
    result = run_shim("--version")
    assert result.returncode == 0
    assert re.search(r"^Version: \d+\.\d+\.\d+\+commit\.[0-9a-f]{8}\.Linux\.g\+\+$", result.stdout, re.M)


def test_large_standard_json_on_stdin_compiles() -> None:
    # The project's own sources, with OpenZeppelin imported, are far larger than a pipe buffer.
    sources = {
        path.relative_to(PROJECT_ROOT).as_posix(): {"content": path.read_text()}
        for path in sorted((PROJECT_ROOT / "contracts" / "src").rglob("*.sol"))
    }
    data = {
        "language": "Solidity",
        "sources": sources,
        "settings": {
            "remappings": ["@openzeppelin/contracts/=node_modules/@openzeppelin/contracts/"],
            "outputSelection": {"*": {"*": ["abi"]}},
        },
    }
    result = run_shim(
        "--standard-json", "--base-path", str(PROJECT_ROOT), "--allow-paths", "/tmp", stdin=json.dumps(data)
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert not [e for e in output.get("errors", []) if e["severity"] == "error"]
    assert "VoucherEscrow" in output["contracts"]["contracts/src/VoucherEscrow.sol"]


def test_unsupported_flag_fails_clearly() -> None:
    result = run_shim("--bin", "x.sol")
    assert result.returncode == 1
    assert "unsupported argument" in result.stderr


def test_a_source_that_does_not_compile_fails_the_build(tmp_path: Path) -> None:
    for name in ("foundry.toml", "bin", "node_modules"):
        (tmp_path / name).symlink_to(PROJECT_ROOT / name)
    (tmp_path / "contracts" / "src").mkdir(parents=True)
    (tmp_path / "contracts" / "src" / "Broken.sol").write_text(
        "pragma solidity ^0.8.26; contract Broken { uint x = ; }"
    )
    with pytest.raises(CompilerError, match="compilation failed"):
        build_contracts(tmp_path)
