"""Fixtures for the gateway's tests: one private chain and one set of provider processes per test session, and
one gateway per database backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from settlement.db.engine import migrate
from tests.marketplace.harness import (
    GatewayServer,
    Market,
    ProviderProcess,
    announce,
    database,
    gateway_settings,
    start_market,
    start_provider,
    stop_providers,
    tiny_model,
    wait_ready,
)

# Spans of the tiny model's 6 layers. "backup" serves B's span at B's price, posted after it: it only wins
# when B is out of the book.
SPANS = {"a": (0, 2), "b": (2, 4), "c": (4, 6), "backup": (2, 4)}


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers() -> None:
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    started = start_market(tmp_path_factory.mktemp("market"))
    try:
        yield started
    finally:
        started.anvil.stop()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ "tiny", which the providers serve, and "lonely", another model that nobody serves."""
    root = tmp_path_factory.mktemp("models")
    return {"tiny": tiny_model(root), "lonely": tiny_model(root, "lonely", seed=4)}


@pytest.fixture(scope="session")
def model_dir(models: dict[str, Path]) -> Path:
    return models["tiny"]


@pytest.fixture(scope="session")
def providers(
    market: Market, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ProviderProcess]]:
    logs = tmp_path_factory.mktemp("provider-logs")
    started = {
        name: start_provider(model_dir, market.providers[i], span, market, log_dir=logs)
        for i, (name, span) in enumerate(SPANS.items())
    }
    try:
        for provider in started.values():
            wait_ready(provider)
        yield started
    finally:
        stop_providers(list(started.values()))


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def migrated(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An empty database on ``backend`` at the newest schema, which each test's database is copied from."""
    with database(backend, tmp_path_factory.mktemp("template")) as url:
        migrate(url)
        yield url


@pytest.fixture
def start_gateway(
    backend: str,
    migrated: str,
    market: Market,
    models: dict[str, Path],
    providers: dict[str, ProviderProcess],
    tmp_path: Path,
) -> Iterator[Callable[..., GatewayServer]]:
    """Starts gateways of the test's own, each on a database of its own on ``backend`` and configured with the
    settings given (over gateway_settings'), with A, B, C and the backup announced (in that order): no test sees
    another's jobs, channels, asks or suspended providers. Stopped when the test ends."""
    with ExitStack() as stack:

        def start(**overrides: object) -> GatewayServer:
            url = stack.enter_context(database(backend, tmp_path, template=migrated))
            server = GatewayServer(gateway_settings(market, url, models, **overrides)).start()
            stack.callback(server.stop)
            root = server.gateway.catalog.get("tiny").root
            for provider in providers.values():
                announce(server.url, provider, root)
            return server

        yield start


@pytest.fixture
def gateway(start_gateway: Callable[..., GatewayServer]) -> GatewayServer:
    return start_gateway()
