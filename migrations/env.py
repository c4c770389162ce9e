"""Alembic environment: the gateway's one migration history, run with the sync drivers.

The URL comes from the Alembic config (``settlement.db.engine.alembic_config`` sets it from DATABASE_URL), or,
when Alembic's own command line runs without one, from the settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from settlement.db.schema import Base

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from settlement.config import SettlementSettings
    from settlement.db.engine import sync_url

    return sync_url(SettlementSettings().database_url).render_as_string(hide_password=False)


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Batch mode lets later migrations alter SQLite tables, which cannot ALTER most things in place.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
