"""What the gateway checks about its configuration before it serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from marketplace.gateway.catalog import load_model
from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.service import check_job_lifetime
from settlement.errors import ConfigurationError


def test_a_job_must_be_redeemable_before_its_payer_can_leave() -> None:
    settings = GatewaySettings(
        max_job_ttl_s=1_800, validation_window_s=600, epoch_s=300, channel_max_age_s=30, _env_file=None
    )  # type: ignore[call-arg]
    # 1,800 + 600 + 300 + 30, and 600 s for the job's run and the epoch's own time.
    check_job_lifetime(settings, withdraw_delay_s=3_331)
    with pytest.raises(ConfigurationError, match="withdraw delay \\(3330 s\\)"):
        check_job_lifetime(settings, withdraw_delay_s=3_330)
    # The defaults fit the default escrow's day-long delay.
    check_job_lifetime(GatewaySettings(_env_file=None), withdraw_delay_s=24 * 3600)  # type: ignore[call-arg]


def test_requests_are_held_to_the_providers_session_limit_and_it_is_advertised(model_dir: Path) -> None:
    """A request above what a provider takes in one session would be refused by every provider on its route:
    the gateway refuses it itself, up front, and says the limit in /v1/models."""
    own = load_model(model_dir)
    assert own.context_length == own.model_context_length == 2_048  # the tiny checkpoint's
    capped = load_model(model_dir, max_session_positions=512)
    assert (capped.context_length, capped.model_context_length) == (512, 2_048)
    assert capped.describe()["context_length"] == 512
    assert load_model(model_dir, max_session_positions=100_000).context_length == 2_048
