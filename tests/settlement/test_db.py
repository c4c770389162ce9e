"""The gateway's database layer on SQLite and PostgreSQL: URL handling, the Alembic history against the models,
upgrade and downgrade, the channel table's voucher invariant and money range, and the async engine."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import CheckConstraint, Engine, insert, inspect, select, text, update
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.exc import DataError, IntegrityError

from settlement.db.engine import alembic_config, async_url, create_engine, migrate, sessions, sync_url
from settlement.db.schema import Ask, Base, Channel, Provider
from settlement.errors import BadDatabaseURL
from tests.marketplace.harness import database

BACKENDS = ["sqlite", "postgresql"]
BIGINT_MAX = 2**63 - 1
TABLES = set(Base.metadata.tables)
CHANNEL_ID = "0x" + "ab" * 32
PAYER = "0x" + "12" * 20
PROVIDER = "0x" + "34" * 20


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as fresh:
        yield fresh


@pytest.fixture
def migrated(url: str) -> str:
    migrate(url)
    return url


@pytest.fixture
def engine(migrated: str) -> Iterator[Engine]:
    sync = create_sync_engine(sync_url(migrated))
    try:
        yield sync
    finally:
        sync.dispose()


def tables(url: str) -> set[str]:
    sync = create_sync_engine(sync_url(url))
    try:
        with sync.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        sync.dispose()


def current_revision(url: str) -> str | None:
    sync = create_sync_engine(sync_url(url))
    try:
        with sync.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        sync.dispose()


def head(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def channel(**values: object) -> dict[str, object]:
    return {"id": CHANNEL_ID, "payer": PAYER, **values}


def test_migrate_creates_every_table_and_is_idempotent(url: str) -> None:
    assert tables(url) == set()
    migrate(url)
    assert tables(url) == TABLES | {"alembic_version"}
    assert current_revision(url) == head(url) is not None

    sync = create_sync_engine(sync_url(url))
    try:
        with sync.begin() as connection:
            connection.execute(insert(Channel).values(channel(voucher_amount=5, charged=2)))
        # A second run must find nothing to do: re-creating or rewriting a table would lose this row or fail.
        migrate(url)
        with sync.connect() as connection:
            rows = connection.execute(select(Channel.id, Channel.voucher_amount, Channel.charged)).all()
    finally:
        sync.dispose()
    assert rows == [(CHANNEL_ID, 5, 2)]
    assert current_revision(url) == head(url)


def test_migrate_creates_a_missing_sqlite_directory(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "gateway.db"
    migrate(f"sqlite:///{path}")
    assert path.is_file()
    assert tables(f"sqlite:///{path}") == TABLES | {"alembic_version"}


def test_migrations_match_the_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []

        # Autogenerate does not compare check constraints, and they carry the money invariants: compare names.
        inspector = inspect(connection)
        for table in Base.metadata.sorted_tables:
            declared = {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
            reflected = {c["name"] for c in inspector.get_check_constraints(table.name)}
            assert reflected == declared, table.name


def test_downgrade_to_base_and_upgrade_again(migrated: str) -> None:
    command.downgrade(alembic_config(migrated), "base")
    # Alembic keeps its (now empty) version table; every gateway table must be gone.
    assert tables(migrated) == {"alembic_version"}
    assert current_revision(migrated) is None

    migrate(migrated)
    assert tables(migrated) == TABLES | {"alembic_version"}
    assert current_revision(migrated) == head(migrated)


def test_offline_migration_renders_sql(url: str) -> None:
    config = alembic_config(url)
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    script = config.output_buffer.getvalue()
    for table in TABLES:
        assert f"CREATE TABLE {table} " in script
    assert "ck_channels_covered_by_voucher" in script
    # Offline mode only writes SQL: the database stays empty.
    assert tables(url) == set()


def test_channel_must_be_covered_by_its_voucher(engine: Engine) -> None:
    refused = [
        (10, 7, 4, "covered_by_voucher"),
        (0, 0, 1, "covered_by_voucher"),
        # One base unit over at the top of the range: the comparison must be exact integers, not floats.
        (BIGINT_MAX - 1, BIGINT_MAX, 0, "covered_by_voucher"),
        (BIGINT_MAX - 1, BIGINT_MAX - 2, 2, "covered_by_voucher"),
        (10, -1, 5, "non_negative"),
        (10, 5, -1, "non_negative"),
    ]
    for voucher_amount, charged, reserved, constraint in refused:
        values = channel(voucher_amount=voucher_amount, charged=charged, reserved=reserved)
        with pytest.raises(IntegrityError, match=constraint), engine.begin() as connection:
            connection.execute(insert(Channel).values(values))
    with engine.connect() as connection:
        assert connection.execute(select(Channel)).all() == []

    # Exactly covered is allowed, and so is raising the voucher later.
    with engine.begin() as connection:
        connection.execute(insert(Channel).values(channel(voucher_amount=10, charged=6, reserved=4)))
    with pytest.raises(IntegrityError, match="covered_by_voucher"), engine.begin() as connection:
        connection.execute(update(Channel).values(reserved=Channel.reserved + 1))
    with engine.begin() as connection:
        connection.execute(update(Channel).values(voucher_amount=11, reserved=Channel.reserved + 1))
    with engine.connect() as connection:
        assert connection.execute(select(Channel.charged, Channel.reserved)).all() == [(6, 5)]


def test_largest_amounts_round_trip_exactly(engine: Engine) -> None:
    # The money columns are BIGINT, so 2**63 - 1 is the largest amount; 2**53 + 1 would not survive a float.
    amounts = {"voucher_amount": BIGINT_MAX, "charged": BIGINT_MAX - 2**53 - 1, "reserved": 2**53 + 1}
    with engine.begin() as connection:
        connection.execute(insert(Channel).values(channel(**amounts)))
        connection.execute(
            insert(Channel).values(
                id="0x" + "cd" * 32, payer=PAYER, voucher_amount=BIGINT_MAX, charged=BIGINT_MAX
            )
        )
    with engine.connect() as connection:
        rows = {
            row.id: (row.voucher_amount, row.charged, row.reserved)
            for row in connection.execute(select(Channel))
        }
    assert rows == {
        CHANNEL_ID: (BIGINT_MAX, BIGINT_MAX - 2**53 - 1, 2**53 + 1),
        "0x" + "cd" * 32: (BIGINT_MAX, BIGINT_MAX, 0),
    }
    for value in rows[CHANNEL_ID]:
        assert type(value) is int


def test_amount_above_bigint_is_refused_not_rounded(engine: Engine) -> None:
    # sqlite3 refuses the int before sending it; PostgreSQL answers "bigint out of range".
    with pytest.raises((OverflowError, DataError)), engine.begin() as connection:
        connection.execute(insert(Channel).values(channel(voucher_amount=BIGINT_MAX + 1)))
    with engine.connect() as connection:
        assert connection.execute(select(Channel)).all() == []


@pytest.mark.parametrize(
    "bad",
    [
        "mysql://x/y",
        "not a url",
        "",
        "oracle+cx_oracle://user@host/db",
        "postgresql://user@host:notaport/db",
    ],
)
@pytest.mark.parametrize("use", [sync_url, async_url, create_engine, migrate, alembic_config])
def test_bad_database_url_is_refused(use: Callable[[str], object], bad: str) -> None:
    with pytest.raises(BadDatabaseURL) as raised:
        use(bad)
    assert raised.value.code == "bad_database_url"


@pytest.mark.parametrize(
    ("given", "sync_driver", "async_driver"),
    [
        ("sqlite:///x.db", "sqlite", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///x.db", "sqlite", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
    ],
)
def test_urls_get_the_project_drivers(given: str, sync_driver: str, async_driver: str) -> None:
    assert sync_url(given).drivername == sync_driver
    assert async_url(given).drivername == async_driver
    assert sync_url(given).database == async_url(given).database


def test_alembic_config_keeps_a_percent_in_the_password() -> None:
    # The config is an INI parser, where a lone % is an interpolation error.
    config = alembic_config("postgresql://user:p%25ss@host/db")
    assert config.get_main_option("sqlalchemy.url") == "postgresql+psycopg://user:p%25ss@host/db"


def test_async_engine_reads_and_writes(migrated: str) -> None:
    seen = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    async def run() -> tuple[Provider | None, str | None]:
        engine = create_engine(migrated)
        try:
            async with sessions(engine)() as session, session.begin():
                session.add(
                    Provider(address=PROVIDER, last_heartbeat_at=seen, heartbeat_timestamp=BIGINT_MAX)
                )
            async with sessions(engine)() as session:
                stored = await session.get(Provider, PROVIDER)
                journal = None
                if engine.dialect.name == "sqlite":
                    journal = (await session.execute(text("PRAGMA journal_mode"))).scalar_one()
            return stored, journal
        finally:
            await engine.dispose()

    stored, journal = asyncio.run(run())
    assert stored is not None
    assert stored.heartbeat_timestamp == BIGINT_MAX
    assert stored.ask_nonce == 0
    # Datetimes come back aware and in UTC on both backends, even though SQLite stores them naive.
    assert stored.last_heartbeat_at == seen
    assert stored.last_heartbeat_at.tzinfo is not None
    assert stored.last_heartbeat_at.utcoffset() == timedelta(0)
    assert stored.first_seen_at.tzinfo is not None
    assert abs(datetime.now(UTC) - stored.first_seen_at) < timedelta(minutes=5)
    assert journal == ("wal" if migrated.startswith("sqlite") else None)


def test_async_engine_enforces_foreign_keys(migrated: str) -> None:
    # SQLite ignores foreign keys unless each connection turns them on; the engine must do it.
    ask = Ask(
        provider=PROVIDER,
        model_root="0x" + "00" * 32,
        layer_start=0,
        layer_end=2,
        price_per_million=1,
        capacity=1,
        endpoint="127.0.0.1:1",
        nonce=1,
        expires_at=2**40,
        signature="0x" + "11" * 65,
    )

    async def run() -> None:
        engine = create_engine(migrated)
        try:
            async with sessions(engine)() as session, session.begin():
                session.add(ask)
        finally:
            await engine.dispose()

    with pytest.raises(IntegrityError):
        asyncio.run(run())


def test_async_sqlite_engine_sets_its_pragmas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'gateway.db'}"

    async def run() -> tuple[str, int, int, int]:
        engine = create_engine(url)  # creates the missing directory, like migrate
        try:
            async with engine.connect() as connection:
                values = [
                    (await connection.execute(text(f"PRAGMA {name}"))).scalar_one()
                    for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
                ]
        finally:
            await engine.dispose()
        return values[0], values[1], values[2], values[3]

    # synchronous: 1 is NORMAL.
    assert asyncio.run(run()) == ("wal", 1, 1, 10000)
