"""Files that hold keys, written readable by their owner only (0600) from the moment they exist."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600

# Settings that hold a private key or unlock one: no process the devnet starts inherits them from the shell
# that ran `strata up`; each is given the one key its role needs.
KEY_SETTINGS = (
    "CLIENT_KEY", "PROVIDER_KEY", "GATEWAY_KEY", "DEPLOYER_KEY", "OPERATOR_KEY", "VALIDATOR_KEY",
    "STRATA_KEYSTORE_PASSWORD",
)  # fmt: skip


def write_private(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` with mode 0600. The file is created under a temporary name with that mode
    (not chmod-ed after, which would leave a moment when others may open it) and renamed over ``path``, so an
    older file of looser mode is replaced rather than reused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def without_keys(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name not in KEY_SETTINGS}
