"""carousel/etcd.py: a closed client stays closed.

Every aetcd call connects first, so a call still running on a client the adapter has
closed (a library call left to end on its own after its time limit) would open a new
channel, and a connection, that nobody closes.
"""

from __future__ import annotations

import aetcd.exceptions as aexc
import pytest

from carousel import etcd


async def test_a_closed_client_opens_no_channel_again() -> None:
    client = etcd._Client(
        "127.0.0.1", 1, credentials=None, username=None, password=None, timeout=1.0, dial_timeout=1.0
    )
    await client.connect()  # a channel connects lazily: nothing is sent yet
    assert client.channel is not None
    await client.close()
    assert client.channel is None
    with pytest.raises(aexc.ConnectionFailedError, match="closed"):
        await client.get(b"/k")
    assert client.channel is None
