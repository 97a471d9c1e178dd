"""Bounded shutdown: stop a daemon's tasks within a deadline, and run its loop so that exit is bounded too.

Also whether a process still exists (`pid_alive`), for what a dead process left behind.

Shutdown in the daemons goes: stop accepting, cancel the background tasks,
wait for them *with a deadline*, then close what is left (as uvicorn's
server does). A task that does not end within the deadline after its
cancellation (a cleanup awaiting a peer that never answers, a handler that
swallows CancelledError) is logged once by name and left behind: the
process exits anyway, instead of hanging until systemd's stop timeout kills
it without a word.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterable
from typing import Any

import structlog

log = structlog.get_logger("carousel.tasks")

# Long enough for an etcd call in flight to return (their own bound is 2 s), short
# enough that a stuck task costs one restart a few seconds, not systemd's 90 s.
SHUTDOWN_DEADLINE = 3.0


async def stop_tasks(
    tasks: Iterable[asyncio.Future[Any]], *, deadline: float | None = None, what: str = "task"
) -> set[asyncio.Future[Any]]:
    """Cancel ``tasks`` and wait at most ``deadline`` seconds; returns (and logs once) those still running."""
    deadline = SHUTDOWN_DEADLINE if deadline is None else deadline
    pending = {t for t in tasks if not t.done()}
    for t in pending:
        t.cancel()
    if not pending:
        return set()
    _, stuck = await asyncio.wait(pending, timeout=deadline)
    if stuck:
        log.warning(
            f"{what} did not stop within the shutdown deadline; leaving it behind",
            deadline=deadline,
            tasks=sorted(_name(t) for t in stuck),
        )
    return stuck


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


def run_loop(main: Coroutine[Any, Any, Any], *, deadline: float | None = None) -> Any:
    """Run ``main`` on uvloop when installed (else asyncio's loop); the teardown is bounded.

    ``asyncio.run`` cancels the tasks ``main`` left behind and then waits for
    them without limit; here they get ``deadline`` seconds, as do async
    generators' cleanups, and stragglers are logged once.
    """
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    deadline = SHUTDOWN_DEADLINE if deadline is None else deadline
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            leftover = asyncio.all_tasks(loop)
            if leftover:
                loop.run_until_complete(stop_tasks(leftover, deadline=deadline, what="background task"))
            loop.run_until_complete(_bounded(loop.shutdown_asyncgens(), deadline, "async generators"))
            loop.run_until_complete(_bounded(loop.shutdown_default_executor(), deadline, "executor threads"))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _bounded(aw: Coroutine[Any, Any, None], deadline: float, what: str) -> None:
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=deadline)
    if not done:
        task.cancel()
        log.warning(f"{what} did not finish within the shutdown deadline", deadline=deadline)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
