"""The real gateway app served by uvicorn in a thread of its own, on a free port: for tests and benchmarks that
need a gateway beside a chain and provider processes they start themselves."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from marketplace.devnet.process import free_port
from marketplace.gateway.api.app import create_app
from marketplace.gateway.config import GatewaySettings


class GatewayServer:
    def __init__(self, settings: GatewaySettings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def gateway(self) -> Any:
        """The running Gateway (marketplace.gateway.service), once started."""
        return self.app.state.gateway
