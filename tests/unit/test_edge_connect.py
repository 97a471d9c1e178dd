"""A new member connection's deadline (MemberConnections.connect): asyncio.timeout's rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edge.upstream.client import ConnectFailed, MemberConnections, UpstreamConnection


def _hang_on_connect(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """Make the loop's create_connection wait forever (a SYN nobody answers)."""
    never: asyncio.Future[Any] = loop.create_future()

    async def create_connection(*args: Any, **kwargs: Any) -> Any:
        return await never

    loop.create_connection = create_connection  # type: ignore[method-assign]
    return never


async def test_a_connect_past_its_deadline_fails_as_a_timeout_and_leaves_no_cancellation() -> None:
    loop = asyncio.get_running_loop()
    _hang_on_connect(loop)
    conns = MemberConnections("127.0.0.1", 9, False, 0.0)
    with pytest.raises(ConnectFailed, match="connect timeout"):
        await conns.connect(0.02)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left pending for this task either


async def test_a_cancellation_from_outside_is_not_taken_for_the_timeout() -> None:
    loop = asyncio.get_running_loop()
    _hang_on_connect(loop)
    conns = MemberConnections("127.0.0.1", 9, False, 0.0)
    connecting = asyncio.ensure_future(conns.connect(5.0))
    await asyncio.sleep(0.01)
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting


async def test_a_connection_made_in_time_is_returned_and_its_timer_is_gone() -> None:
    loop = asyncio.get_running_loop()

    async def create_connection(factory: Any, host: str, port: int) -> Any:
        await asyncio.sleep(0)
        return None, factory()

    loop.create_connection = create_connection  # type: ignore[method-assign]
    conns = MemberConnections("127.0.0.1", 9, False, 0.0)
    conn = await conns.connect(0.02)
    assert isinstance(conn, UpstreamConnection)
    await asyncio.sleep(0.05)  # past the deadline: nothing cancels this task now
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_refused_connect_fails_with_the_reason() -> None:
    loop = asyncio.get_running_loop()

    async def create_connection(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    loop.create_connection = create_connection  # type: ignore[method-assign]
    conns = MemberConnections("127.0.0.1", 9, False, 0.0)
    with pytest.raises(ConnectFailed, match="Connection refused"):
        await conns.connect(5.0)
