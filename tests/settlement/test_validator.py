"""Who answers for data a provider did not produce: the provider inside its window, nobody after it, however
late the validator came; an unreachable provider only if the validator kept trying to the end."""

from __future__ import annotations

import pytest

from settlement.db.schema import ValidationStatus
from settlement.validator import unavailable

DEADLINE = 1_000.0
PATIENCE = 40.0  # a retry interval and a fetch
FAILED, MISSED = ValidationStatus.FAILED, ValidationStatus.MISSED


@pytest.mark.parametrize(("now", "expected"), [(10.0, FAILED), (DEADLINE, FAILED), (DEADLINE + 1, MISSED)])
def test_a_refusal_is_the_providers_fault_only_inside_its_window(
    now: float, expected: ValidationStatus
) -> None:
    assert unavailable(now=now, deadline=DEADLINE, refused=True) == expected


def test_late_because_of_the_validator_is_never_the_providers_fault() -> None:
    """The first attempt inside the window found no reference weights (not counted), the next came after it:
    the provider, now free to have dropped the data, is not blamed."""
    assert unavailable(now=DEADLINE + 3_600, deadline=DEADLINE, refused=True) == MISSED
    assert (
        unavailable(
            now=DEADLINE + 3_600,
            deadline=DEADLINE,
            refused=False,
            unreachable_since=DEADLINE + 3_600,
            previous_attempt=None,
            patience_s=PATIENCE,
        )
        == MISSED
    )


def test_unreachable_is_retried_until_the_deadline() -> None:
    assert unavailable(now=DEADLINE - 1, deadline=DEADLINE, refused=False, unreachable_since=5.0) is None


@pytest.mark.parametrize(
    ("unreachable_since", "previous_attempt", "expected"),
    [
        (100.0, DEADLINE - 10, FAILED),  # silent from 100 s on, and tried 10 s before the end
        (100.0, DEADLINE - 300, MISSED),  # the validator stopped trying long before the end
        (DEADLINE - 5, DEADLINE - 10, MISSED),  # it answered at the attempt before: not silent throughout
        (None, DEADLINE - 10, MISSED),
    ],
    ids=["kept-trying", "stopped-early", "answered-before", "never-silent"],
)
def test_unreachable_past_the_deadline_blames_the_provider_only_if_the_validator_kept_trying(
    unreachable_since: float | None, previous_attempt: float, expected: ValidationStatus
) -> None:
    status = unavailable(
        now=DEADLINE + 5, deadline=DEADLINE, refused=False, unreachable_since=unreachable_since,
        previous_attempt=previous_attempt, patience_s=PATIENCE,
    )  # fmt: skip
    assert status == expected


def test_unreachable_an_hour_after_the_deadline_blames_nobody() -> None:
    """The validator tried just before the end, then went down for an hour: what it finds then says nothing
    about the provider inside its window."""
    status = unavailable(
        now=DEADLINE + 3_600, deadline=DEADLINE, refused=False, unreachable_since=100.0,
        previous_attempt=DEADLINE - 10, patience_s=PATIENCE,
    )  # fmt: skip
    assert status == MISSED
