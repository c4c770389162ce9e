"""Jobs resting in the book until a route within their price appears: capped, and indexed by what they bid.

A resting job holds its whole max price, paid, and costs the gateway a look at every book change. So there are
at most ``max_per_payer`` of one payer, checked before any payment is taken, and at most ``max_jobs`` in all:
when the book is full a new job is taken only if it bids more per position than the lowest resting bid, which is
then expired at the next sweep (uncharged). Filling the book with bids of one unit does not lock anyone out.

A sweep must cost what changed, not every resting job. Each model's jobs are kept in order of their bid per
position (max price over positions, highest first, then oldest), and a route's cost per position is its price
per token, the same for every job up to per-hop rounding. A sweep walks a model's bids from the top and stops
at the first bid below the route's rate: no job after it can afford the route. Jobs just above the rate that
rounding puts a unit or two over their price are passed over, not stopped at. Expiry is a heap by deadline.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from marketplace.gateway.errors import GatewayError

if TYPE_CHECKING:
    from marketplace.gateway.catalog import ServedModel
    from marketplace.gateway.jobs import JobRun


class TooManyResting(GatewayError):
    """The book holds as many resting jobs as it takes, in all or of this payer."""

    status = 429
    kind = "rate_limit_error"


@dataclass
class Resting:
    run: JobRun
    created: float
    expires: float

    @property
    def bid(self) -> Fraction:
        """Base units offered per position: what the route's price per position must not exceed."""
        return Fraction(self.run.reservation.quote, self.run.request.quote_tokens)

    @property
    def order(self) -> tuple[Fraction, float, str]:
        return (-self.bid, self.created, self.run.job_id)


class RestingJobs:
    def __init__(self, *, max_jobs: int, max_per_payer: int) -> None:
        self.max_jobs = max_jobs
        self.max_per_payer = max_per_payer
        self._jobs: dict[str, Resting] = {}
        self._by_model: dict[str, list[tuple[tuple[Fraction, float, str], Resting]]] = defaultdict(list)
        self._by_payer: Counter[str] = Counter()
        self._deadlines: list[tuple[float, str]] = []
        self._evicting: set[str] = set()  # outbid, to be expired at the next sweep

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def check_room(self, payer: str | None, bid: Fraction) -> None:
        """Raises TooManyResting when one more job of ``payer``, bidding ``bid`` per position, would not be
        taken."""
        if payer is not None and self._by_payer[payer] >= self.max_per_payer:
            raise TooManyResting(
                "too_many_resting_jobs", f"{payer} has {self.max_per_payer} jobs resting already"
            )
        if len(self._jobs) - len(self._evicting) >= self.max_jobs:
            lowest = self._lowest()
            if lowest is None or bid <= lowest.bid:
                raise TooManyResting(
                    "too_many_resting_jobs",
                    f"the book holds {self.max_jobs} resting jobs; bid more per position than the lowest of "
                    f"them ({lowest.bid if lowest else 0}) to take its place",
                )

    def add(self, resting: Resting) -> None:
        job_id = resting.run.job_id
        self._jobs[job_id] = resting
        bisect.insort(self._by_model[resting.run.request.model.root], (resting.order, resting))
        if resting.run.reservation.payer is not None:
            self._by_payer[resting.run.reservation.payer] += 1
        heapq.heappush(self._deadlines, (resting.expires, job_id))
        if len(self._jobs) - len(self._evicting) > self.max_jobs:
            lowest = self._lowest()
            if lowest is not None:  # outbid: it leaves at the next sweep, as an expired job does
                self._evicting.add(lowest.run.job_id)
                heapq.heappush(self._deadlines, (float("-inf"), lowest.run.job_id))

    def _lowest(self) -> Resting | None:
        """The lowest bid in the book (the latest of equal ones), of those not already on their way out."""
        ends = [
            next((r for _, r in reversed(bids) if r.run.job_id not in self._evicting), None)
            for bids in self._by_model.values()
        ]
        candidates = [r for r in ends if r is not None]
        return max(candidates, key=lambda r: r.order) if candidates else None

    def remove(self, job_id: str) -> Resting | None:
        resting = self._jobs.pop(job_id, None)
        self._evicting.discard(job_id)
        if resting is None:
            return None
        bids = self._by_model[resting.run.request.model.root]
        index = bisect.bisect_left(bids, (resting.order,))
        if index < len(bids) and bids[index][1] is resting:
            del bids[index]
        payer = resting.run.reservation.payer
        if payer is not None:
            self._by_payer[payer] -= 1
            if self._by_payer[payer] == 0:
                del self._by_payer[payer]
        return resting

    def expired(self, now: float) -> list[Resting]:
        """Takes out and returns the jobs whose time is up."""
        gone = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self._deadlines)
            resting = self.remove(job_id)  # None: it started or ended before its deadline
            if resting is not None:
                gone.append(resting)
        return gone

    def values(self) -> list[Resting]:
        return list(self._jobs.values())

    def models(self) -> list[ServedModel]:
        """The models some job rests for."""
        return [bids[0][1].run.request.model for bids in self._by_model.values() if bids]

    def bids(self, model_root: str, rate: Fraction) -> Iterator[Resting]:
        """``model_root``'s jobs bidding at least ``rate`` per position, best first. Safe to remove the job
        just yielded."""
        for _, resting in list(self._by_model[model_root]):
            if resting.bid < rate:
                return
            if resting.run.job_id in self._jobs:
                yield resting
