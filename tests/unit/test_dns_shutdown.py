"""Bounded shutdown: a task that will not stop is cancelled, logged once, and left behind."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from carousel.tasks import run_loop, stop_tasks


async def _stubborn(started: asyncio.Event) -> None:
    """A task whose cleanup never ends: it swallows its cancellation and keeps waiting."""
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(3600)


async def _polite() -> None:
    await asyncio.sleep(3600)


def test_stop_tasks_gives_up_on_a_stuck_task_at_the_deadline_and_logs_it_once() -> None:
    async def main() -> tuple[float, set[asyncio.Future[None]], bool]:
        started = asyncio.Event()
        stuck = asyncio.create_task(_stubborn(started), name="stubborn-cleanup")
        polite = asyncio.create_task(_polite(), name="polite")
        await started.wait()
        t0 = time.monotonic()
        left = await stop_tasks({stuck, polite}, deadline=0.3, what="test task")
        took = time.monotonic() - t0
        cancelled = polite.cancelled()
        stuck.cancel()  # a second cancel ends it: the test leaves nothing running
        await asyncio.gather(stuck, return_exceptions=True)
        return took, left, cancelled

    with capture_logs() as logs:
        took, left, polite_cancelled = asyncio.run(main())
    assert 0.25 <= took < 2.0, took
    assert [t.get_name() for t in left] == ["stubborn-cleanup"]  # type: ignore[attr-defined]
    assert polite_cancelled
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["tasks"] == ["stubborn-cleanup"], logs


def test_stop_tasks_returns_at_once_when_every_task_ends() -> None:
    async def main() -> tuple[float, set[asyncio.Future[None]]]:
        tasks = {asyncio.create_task(_polite()) for _ in range(3)}
        await asyncio.sleep(0)
        t0 = time.monotonic()
        left = await stop_tasks(tasks, deadline=5.0)
        return time.monotonic() - t0, left

    with capture_logs() as logs:
        took, left = asyncio.run(main())
    assert took < 1.0 and not left and not logs


def test_run_loop_exits_within_the_deadline_when_main_leaves_a_stuck_task_behind() -> None:
    kept: list[asyncio.Task[None]] = []

    async def main() -> int:
        started = asyncio.Event()
        kept.append(asyncio.create_task(_stubborn(started), name="left-behind"))
        await started.wait()
        return 7

    t0 = time.monotonic()
    with capture_logs() as logs:
        code = run_loop(main(), deadline=0.3)
    took = time.monotonic() - t0
    # asyncio.run would wait for the task's cleanup forever; the bounded loop gives up.
    assert code == 7 and took < 3.0, took
    assert [e["tasks"] for e in logs if e["log_level"] == "warning"] == [["left-behind"]], logs
