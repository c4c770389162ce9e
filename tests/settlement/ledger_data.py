"""A fresh ledger database per test, on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from settlement.testing.ledger import ledger_sessions
from tests.marketplace.harness import database


@contextmanager
def ledger_database(backend: str, tmp: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a fresh, migrated database on ``backend``."""
    with database(backend, tmp) as url, ledger_sessions(url) as sessions:
        yield sessions
