"""Errors of the local devnet.

ServiceFailed    a local service did not start, or died: ``code`` says which way, ``log`` where it said why
    codes: service_exited, startup_timeout, not_installed, database_unavailable, database_not_empty,
           broker_unavailable
"""

from __future__ import annotations

from pathlib import Path


class ServiceFailed(Exception):
    def __init__(self, message: str, code: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.log = log
