"""A schemathesis check of our own, loaded by test_openapi's `st run` (its `hooks`): a request the document says
is valid may be refused with 400 only for a rule no JSON schema can state.

Some requests are judged against what the document cannot know: the model's context and the prompt's length in
its tokens, the clock (an ask's expiry, a heartbeat's timestamp), the model's layers and this gateway's
validation window. Those refusals have codes of their own, listed here. Any other 400 for schema-valid data (a
pydantic ``invalid_request``, ``unsupported_parameter``, …) means the document leaves out a rule the gateway
enforces, and fails.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

RULES_NO_SCHEMA_STATES = frozenset(
    {
        "prompt_too_long",  # the prompt's tokens and max_tokens against the model's context
        "bad_span",  # an ask's layers against the model's
        "bad_expiry",  # an ask's expiresAt against the clock
        "short_retention",  # an ask's retentionS against the gateway's validation window
        "bad_endpoint",  # an ask's host:port
        "plaintext_endpoint",  # an ask without a certificate, at a gateway that wants one
        "bad_timestamp",  # a heartbeat's timestamp against the clock
        "token_out_of_range",  # a token id (a prompt's, logit_bias') against the model's vocabulary
        "invalid_schema",  # a response format or tool's JSON schema the grammar library cannot follow
        "conflicting_parameters",  # a rule between fields: top_logprobs without logprobs, tool_choice without tools
        "ttl_too_long",  # a job's ttl_s against this gateway's MAX_JOB_TTL_S
        "chat_template_refused",  # a conversation the model's chat template will not render
        "unencodable_text",  # text its tokenizer cannot encode (a lone surrogate, which JSON allows)
        # A PAYMENT-SIGNATURE header that is not base64 of a JSON object: a pattern could say base64, not what it
        # decodes to ("null" is base64 of three bytes that are no JSON).
        "invalid_payment_header",
    }
)


@schemathesis.check
def valid_requests_are_refused_only_for_rules_no_schema_states(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = _error_code(response)
    if code not in RULES_NO_SCHEMA_STATES:
        raise AssertionError(
            f"a request the document says is valid was refused as {code!r}: the document should state the rule\n"
            f"{response.content[:500]!r}"
        )
    return None


def _error_code(response: schemathesis.Response) -> Any:
    try:
        return json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
