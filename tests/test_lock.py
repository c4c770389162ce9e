"""bin/check-lock, which `make test` runs first: quiet while requirements.lock satisfies pyproject.toml, and a
failure that says to run `make lock` as soon as it does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def check(pyproject: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "bin" / "check-lock"),
            "--pyproject",
            str(pyproject),
            "--lock",
            str(LOCK),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def project(tmp_path: Path, *dependencies: str) -> Path:
    listed = ", ".join(f'"{dependency}"' for dependency in dependencies)
    path = tmp_path / "pyproject.toml"
    path.write_text(f'[project]\nname = "probe"\nversion = "0"\ndependencies = [{listed}]\n')
    return path


def test_the_committed_lock_satisfies_the_project() -> None:
    result = check(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "dependencies",
    [
        # The CPU build's local version label (+cpu) satisfies a plain pin, as pip treats it.
        ("torch==2.13.0", "uvicorn>=0.40"),
        # An extra whose packages the lock holds.
        ("sqlalchemy[asyncio]~=2.0",),
    ],
)
def test_requirements_the_lock_admits_pass(tmp_path: Path, dependencies: tuple[str, ...]) -> None:
    result = check(project(tmp_path, *dependencies))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("dependency", "problem"),
    [
        ("transformers>=999", "transformers>=999 (wanted by pyproject.toml) is locked at"),
        (
            "a-package-nobody-locked>=1",
            "a-package-nobody-locked>=1 (wanted by pyproject.toml) is not in the lock",
        ),
        # uvicorn is locked, but the packages its "standard" extra asks for are not.
        ("uvicorn[standard]>=0.40", "(wanted by uvicorn "),
    ],
)
def test_a_requirement_the_lock_does_not_satisfy_fails_and_says_what_to_run(
    tmp_path: Path, dependency: str, problem: str
) -> None:
    result = check(project(tmp_path, dependency))
    assert result.returncode == 1
    assert problem in result.stderr
    assert "Run `make lock`" in result.stderr
