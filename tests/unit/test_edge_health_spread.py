"""Active health checks of a big pool: spread over the interval, bounded in flight."""

from __future__ import annotations

import asyncio
import selectors

import aiohttp

from carousel.registry import Keys
from edge.main import from_dict
from edge.upstream import pool as pool_mod
from edge.upstream.pool import Member, UpstreamPool

MEMBERS = 500
INTERVAL = 1.0


def _pool() -> UpstreamPool:
    cfg = from_dict(
        {
            "pool": {
                "p": {
                    "members": [{"address": f"127.0.0.1:{9000 + i}"} for i in range(MEMBERS)],
                    "health": {"enabled": True, "interval": INTERVAL, "timeout": 0.5},
                }
            }
        }
    )
    return UpstreamPool("p", cfg.pool["p"], None, Keys())


class _VirtualClock(selectors.DefaultSelector):
    """A selector that, instead of sleeping, moves a virtual clock to the next timer.

    The health loop's schedule is then measured as it was planned: on a loaded
    machine (load average 10-17) the real loop stalls for tenths of a second and
    starts a tenth of the interval's checks in one turn, which says nothing about
    the spread the loop asked for. No socket is used here.
    """

    now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready and timeout:
            self.now += timeout
        return ready


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.clock = _VirtualClock()
        super().__init__(self.clock)

    def time(self) -> float:
        return self.clock.now


def test_checks_of_500_members_are_spread_and_bounded() -> None:
    loop = _VirtualTimeLoop()
    try:
        loop.run_until_complete(_spread_and_bounded())
    finally:
        loop.close()


async def _spread_and_bounded() -> None:
    pool = _pool()
    loop = asyncio.get_running_loop()
    starts: dict[str, list[float]] = {}
    in_flight = 0
    most = 0

    async def fake_check(session: aiohttp.ClientSession, m: Member) -> bool:
        nonlocal in_flight, most
        starts.setdefault(m.name, []).append(loop.time())
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.03)  # checks overlap: ~15 in flight when spread evenly
        finally:
            in_flight -= 1
        return True

    pool._check = fake_check  # type: ignore[method-assign]
    began = loop.time()
    task = asyncio.create_task(pool._health_loop())
    await asyncio.sleep(INTERVAL * 1.3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    # Every member was checked within one interval (plus the 10 % jitter).
    firsts = sorted(times[0] - began for times in starts.values())
    assert len(firsts) == MEMBERS and firsts[-1] <= INTERVAL * 1.15
    # Spread out: no tenth of the interval holds more than twice its even share
    # (all 500 at once before: a burst that hits every AP server together).
    tenth = INTERVAL / 10
    per_tenth = [sum(1 for t in firsts if k * tenth <= t < (k + 1) * tenth) for k in range(10)]
    assert max(per_tenth) <= 2 * MEMBERS / 10, per_tenth
    # Bounded: never more checks in flight than the pool allows.
    assert most <= pool_mod.MAX_CHECKS_IN_FLIGHT
    # And each member is checked about once per interval, not more.
    assert all(len(times) <= 2 for times in starts.values())
    assert all(m.healthy for m in pool.members.values())
