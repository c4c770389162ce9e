"""The gateway answers as its OpenAPI document says.

Schemathesis (`st run`, every check) draws requests from the document, valid and not, sends them to a live
gateway with providers in its book, and checks every answer against the document: its status, content type,
headers and body; that invalid requests are refused and valid ones are not (an unpaid request is answered 402
with its quote, as documented); that a method a path does not take is answered 405 with an ``Allow`` header; and
openapi_checks' own check. A few examples per operation and a fixed seed keep it short and reproducible. What an
unpaid client cannot reach (answers, streams, jobs and channels of a paying one) is checked against the same
document after it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import schemathesis

from settlement.deploy import ONE_TOKEN
from tests.marketplace.harness import (
    GatewayServer,
    Market,
    chat_body,
    open_channel,
    strata_client,
    wallet_for,
)

ST = str(Path(sys.executable).with_name("st"))
HOOKS = Path(__file__).with_name("openapi_checks.py")
MAX_EXAMPLES = 10  # per operation and phase
SEED = 1
TIMEOUT_S = (
    240  # far above what a run takes (about 20 s): a run that hangs fails rather than stalls the suite
)

# Answers expected beyond schemathesis' defaults, and the exceptions, each with its reason.
CONFIG = """
hooks = "{hooks}"

# Every check, schemathesis' own and openapi_checks'. (Set here rather than as `--checks all`, which would
# override the exceptions below.)
[checks]
enabled = true

[[operations]]
include-operation-id = ["createChatCompletion", "createCompletion", "createJob"]
# 402: an unpaid request is answered with its quote (PAYMENT-REQUIRED), as documented. 400: a prompt too long for
# the model's context, which no schema can state; openapi_checks fails any other 400 of a valid request.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "402", "403", "404", "409", "429", "5xx"]

[[operations]]
include-operation-id = "refundBatchChannel"
# 402: without a refund payload the answer is the batch-settlement requirement to sign one against, as documented.
checks.positive_data_acceptance.expected-statuses = ["2xx", "402", "429", "5xx"]

[[operations]]
include-operation-id = "postAsk"
# 400: an ask judged against the clock, the model and the validation window (bad_expiry, bad_span, ...), which no
# schema can state; openapi_checks fails any other 400 of a valid request.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]

[[operations]]
include-operation-id = "postHeartbeat"
# 400: a timestamp too far from the gateway's clock (bad_timestamp), as for asks above.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
# GET /v1/providers/heartbeat is getProvider's (/v1/providers/{{address}}): it is answered, 400 for an address
# that is not one, rather than 405; and so OPTIONS there allows GET beside POST.
checks.unsupported_method.enabled = false
checks.allow_header_conformance.enabled = false
"""

# The document does not depend on the gateway's database: one backend is enough.
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def schemathesis_run(url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """`st run` against the gateway at ``url``, in ``workdir`` (where it writes what it keeps)."""
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG.format(hooks=HOOKS))
    command = [
        ST, "--config-file", str(config), "run", f"{url}/openapi.json",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--no-color",
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


@on_sqlite
def test_the_gateway_answers_as_its_openapi_document_says(gateway: GatewayServer, tmp_path: Path) -> None:
    run = schemathesis_run(gateway.url, tmp_path)
    assert run.returncode == 0, run.stdout[-30_000:] + run.stderr[-5_000:]


@on_sqlite
def test_paid_answers_streams_jobs_and_channels_are_as_documented(
    gateway: GatewayServer, market: Market
) -> None:
    document = schemathesis.openapi.from_dict(httpx.get(f"{gateway.url}/openapi.json").json())
    client = market.clients[0]
    wallet = wallet_for(market, client, open_channel(market, client, 10 * ONE_TOKEN))
    completion = {"model": "tiny", "prompt": "Once upon", "max_tokens": 4, "temperature": 0}

    async def exchange() -> list[tuple[str, str, httpx.Response]]:
        async with strata_client(gateway.url, wallet) as strata:
            http = strata.http
            answers = [
                ("/v1/chat/completions", "POST", await http.post("/v1/chat/completions", json=chat_body())),
                ("/v1/chat/completions", "POST", await http.post("/v1/chat/completions", json=chat_body(stream=True))),
                ("/v1/completions", "POST", await http.post("/v1/completions", json=completion)),
                ("/v1/completions", "POST", await http.post("/v1/completions", json={**completion, "stream": True})),
                ("/v1/jobs", "POST", await http.post("/v1/jobs", json=completion)),
            ]  # fmt: skip
            job = answers[-1][2].json()["id"]
            answers += [
                ("/v1/jobs/{job_id}", "GET", await http.get(f"/v1/jobs/{job}")),
                ("/v1/channels/{channel_id}", "GET", await http.get(f"/v1/channels/{wallet.channel_hex}")),
            ]
            return answers

    for path, method, response in asyncio.run(exchange()):
        assert response.status_code < 300, (path, response.text)
        document[path][method].validate_response(response)


@on_sqlite
def test_every_route_documents_400_with_the_error_body_and_no_422(gateway: GatewayServer) -> None:
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert "422" not in answers, (method, path)
            assert answers["400"]["content"]["application/json"]["schema"] == error_body, (method, path)
