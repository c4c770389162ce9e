"""Database URLs, engines and migrations.

Users write plain URLs (``sqlite:///FILE``, ``postgresql://USER@HOST/DB``); the gateway talks to them through
async drivers (aiosqlite, psycopg 3), and settlement's Celery tasks and Alembic through the same drivers' sync
side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from settlement.config import PROJECT_ROOT
from settlement.errors import BadDatabaseURL

MIGRATIONS = PROJECT_ROOT / "migrations"
_DRIVERS = {
    "sqlite": ("sqlite", "sqlite+aiosqlite"),
    "postgresql": ("postgresql+psycopg", "postgresql+psycopg"),
}


def _parsed(url: str) -> tuple[URL, str]:
    try:
        parsed = make_url(url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError, and ValueError for a bad port
        raise BadDatabaseURL(f"{url!r} is not a database URL: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend not in _DRIVERS:
        raise BadDatabaseURL(f"{backend!r} is not supported: use sqlite or postgresql")
    return parsed, backend


def sync_url(url: str) -> URL:
    parsed, backend = _parsed(url)
    return parsed.set(drivername=_DRIVERS[backend][0])


def async_url(url: str) -> URL:
    parsed, backend = _parsed(url)
    return parsed.set(drivername=_DRIVERS[backend][1])


def _ensure_sqlite_directory(url: URL) -> None:
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the one writer; NORMAL syncs at checkpoints, which WAL keeps crash-safe.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    target = async_url(url)
    _ensure_sqlite_directory(target)
    engine = create_async_engine(target, pool_pre_ping=target.get_backend_name() != "sqlite")
    if target.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def create_blocking_engine(url: str) -> Engine:
    """A synchronous engine, for Celery tasks and command-line tools."""
    target = sync_url(url)
    _ensure_sqlite_directory(target)
    engine = create_sync_engine(target, pool_pre_ping=target.get_backend_name() != "sqlite")
    if target.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def blocking_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's config is an INI parser: a literal % must be doubled.
    config.set_main_option(
        "sqlalchemy.url", sync_url(url).render_as_string(hide_password=False).replace("%", "%%")
    )
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Brings the database at ``url`` up to ``revision``, creating it (SQLite) if needed."""
    _ensure_sqlite_directory(sync_url(url))
    command.upgrade(alembic_config(url), revision)
