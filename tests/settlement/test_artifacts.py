"""Loading the contracts' build artifacts: what forge built is what Python deploys, and a checkout that was
never built says so clearly instead of compiling at run time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from settlement.artifacts import CONTRACT_NAMES, artifacts_dir, load_artifacts
from settlement.errors import ContractsNotBuilt


def test_every_deployable_contract_has_its_abi_and_bytecode() -> None:
    artifacts = load_artifacts()
    assert set(artifacts) == set(CONTRACT_NAMES)
    for artifact in artifacts.values():
        assert len(bytes.fromhex(artifact.bytecode.removeprefix("0x"))) > 1_000
        assert any(entry.get("type") == "constructor" for entry in artifact.abi)


def test_loading_reads_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    for name in CONTRACT_NAMES:
        (out / f"{name}.sol").mkdir(parents=True)
        shutil.copy(artifacts_dir() / f"{name}.sol" / f"{name}.json", out / f"{name}.sol" / f"{name}.json")
    monkeypatch.setenv("PATH", "")  # no forge, no node, no solc: nothing could compile
    assert load_artifacts(out) == load_artifacts()


def test_missing_artifacts_say_how_to_build_them(tmp_path: Path) -> None:
    with pytest.raises(ContractsNotBuilt, match="make contracts"):
        load_artifacts(tmp_path / "never-built")


def test_a_damaged_artifact_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for name in CONTRACT_NAMES:
        (out / f"{name}.sol").mkdir(parents=True)
        (out / f"{name}.sol" / f"{name}.json").write_text(
            json.dumps({"abi": [], "bytecode": {"object": "0x"}})
        )
    with pytest.raises(ContractsNotBuilt, match="no bytecode"):
        load_artifacts(out)
