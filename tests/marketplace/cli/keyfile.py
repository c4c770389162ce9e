"""Key files for the CLI tests: the commands take keys from files (mode 0600), never from their arguments."""

from __future__ import annotations

import os
from pathlib import Path

from eth_account.signers.local import LocalAccount


def key_file(key: LocalAccount | str, directory: Path | None = None, *, mode: int = 0o600) -> str:
    """Writes ``key`` (an account, or any text) to a file readable by its owner only; returns its path."""
    text = key if isinstance(key, str) else "0x" + bytes(key.key).hex()
    folder = directory or Path.cwd()
    path = folder / f"key-{os.urandom(4).hex()}"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text + "\n")
    os.chmod(path, mode)  # the umask may have taken bits away from a test's looser mode
    return str(path)
