"""The book of resting jobs: caps checked before payment, best bids first, a sweep that stops where bids stop
affording the route, and expiry by deadline."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import pytest

from marketplace.gateway.resting import Resting, RestingJobs, TooManyResting


def resting(job: str, *, quote: int, positions: int, payer: str | None = "0xA", created: float = 0.0,
            expires: float = 100.0, model: str = "m") -> Resting:  # fmt: skip
    run: Any = SimpleNamespace(
        job_id=job,
        reservation=SimpleNamespace(quote=quote, payer=payer),
        request=SimpleNamespace(quote_tokens=positions, model=SimpleNamespace(root=model)),
    )
    return Resting(run, created, expires)


def test_caps_in_all_and_per_payer_are_checked_before_a_job_is_taken() -> None:
    book = RestingJobs(max_jobs=3, max_per_payer=2)
    book.add(resting("1", quote=10, positions=10, payer="0xA"))
    book.add(resting("2", quote=10, positions=10, payer="0xA"))
    with pytest.raises(TooManyResting) as refused:
        book.check_room("0xA", Fraction(100))  # however much it bids
    assert (refused.value.status, refused.value.code) == (429, "too_many_resting_jobs")
    book.check_room("0xB", Fraction(1))
    book.add(resting("3", quote=10, positions=10, payer="0xB"))
    with pytest.raises(TooManyResting):
        book.check_room("0xC", Fraction(1))  # the book is full, and this bids no more than the lowest
    book.remove("1")
    book.check_room("0xA", Fraction(1))  # room again, for anyone


def test_a_full_book_takes_a_better_bid_and_the_lowest_leaves_at_the_next_sweep() -> None:
    """Filling the book with one-unit bids locks nobody out: a better bid takes the lowest one's place."""
    book = RestingJobs(max_jobs=2, max_per_payer=10)
    book.add(resting("spam-1", quote=1, positions=10, payer="0xS", created=1))
    book.add(resting("spam-2", quote=1, positions=10, payer="0xS", created=2))
    book.check_room("0xA", Fraction(5, 10))
    book.add(resting("real", quote=5, positions=10, payer="0xA", created=3))
    assert [r.run.job_id for r in book.expired(now=0)] == ["spam-2"]  # the latest of the lowest
    assert len(book) == 2 and "real" in book and "spam-1" in book
    with pytest.raises(TooManyResting):
        book.check_room("0xB", Fraction(1, 10))  # no better than what is left at the bottom


def test_bids_come_best_first_and_stop_below_the_routes_rate() -> None:
    book = RestingJobs(max_jobs=10, max_per_payer=10)
    book.add(resting("cheap", quote=10, positions=10, created=1))  # 1 a position
    book.add(resting("rich", quote=50, positions=10, created=2))  # 5 a position
    book.add(resting("fair-old", quote=30, positions=10, created=3))  # 3 a position
    book.add(resting("fair-new", quote=60, positions=20, created=4))  # 3 a position, posted later
    book.add(resting("other-model", quote=90, positions=10, model="n"))
    assert [r.run.job_id for r in book.bids("m", Fraction(0))] == ["rich", "fair-old", "fair-new", "cheap"]
    # A route at 3 a position: nothing below it is even looked at.
    assert [r.run.job_id for r in book.bids("m", Fraction(3))] == ["rich", "fair-old", "fair-new"]
    assert [r.run.job_id for r in book.bids("m", Fraction(6))] == []
    assert sorted(model.root for model in book.models()) == ["m", "n"]


def test_a_job_taken_out_while_bids_are_walked_is_not_yielded_again() -> None:
    book = RestingJobs(max_jobs=10, max_per_payer=10)
    for n in range(4):
        book.add(resting(str(n), quote=10 + n, positions=10))
    seen = []
    for r in book.bids("m", Fraction(0)):
        seen.append(r.run.job_id)
        book.remove("0")  # the last one, removed early: never yielded
    assert seen == ["3", "2", "1"] and len(book) == 3


def test_expired_jobs_come_out_by_deadline_and_started_ones_are_skipped() -> None:
    book = RestingJobs(max_jobs=10, max_per_payer=10)
    book.add(resting("soon", quote=10, positions=10, expires=5))
    book.add(resting("later", quote=10, positions=10, expires=50))
    book.add(resting("started", quote=10, positions=10, expires=1))
    book.remove("started")
    assert [r.run.job_id for r in book.expired(10)] == ["soon"]
    assert "later" in book and "soon" not in book and len(book) == 1
    assert book.expired(10) == []
