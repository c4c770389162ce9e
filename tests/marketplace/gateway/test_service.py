"""What the gateway checks about its configuration before it serves."""

from __future__ import annotations

import pytest

from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.service import check_job_lifetime
from settlement.errors import ConfigurationError


def test_a_job_must_be_redeemable_before_its_payer_can_leave() -> None:
    settings = GatewaySettings(max_job_ttl_s=1_800, validation_window_s=600, epoch_s=300, _env_file=None)  # type: ignore[call-arg]
    check_job_lifetime(settings, withdraw_delay_s=2_701)
    with pytest.raises(ConfigurationError, match="withdraw delay \\(2700 s\\)"):
        check_job_lifetime(settings, withdraw_delay_s=2_700)
    # The defaults fit the default escrow's day-long delay.
    check_job_lifetime(GatewaySettings(_env_file=None), withdraw_delay_s=24 * 3600)  # type: ignore[call-arg]
