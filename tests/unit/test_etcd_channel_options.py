"""carousel/etcd.py: a connection attempt gets the dial timeout to finish its TLS handshake.

gRPC cuts a connection attempt after max(backoff, min_reconnect_backoff_ms); at 100 ms a
TLS handshake that takes seconds (measured 3-8 s on TCG-emulated VMs) never finished and
the client redialled for ever. The retry pace after a refused connection stays fast.
"""

from __future__ import annotations

import pytest

from carousel import etcd


@pytest.mark.parametrize(("dial_timeout", "connect_ms"), [(2.0, 2000), (10.0, 10000), (0.05, 100)])
def test_a_connection_attempt_gets_the_dial_timeout(dial_timeout: float, connect_ms: int) -> None:
    options = etcd.channel_options(dial_timeout)
    assert options["grpc.min_reconnect_backoff_ms"] == connect_ms
    # Sub-second reconnects after a refused connection (a restarted etcd) are kept: a failed
    # channel is kept 30 s, so the cap (up to 1.2x with gRPC's jitter) plus the next probe
    # is how late a returning etcd is found; dnsd's answers must catch up within 1 s.
    assert options["grpc.initial_reconnect_backoff_ms"] == 100
    assert options["grpc.max_reconnect_backoff_ms"] == 500


def test_the_client_is_built_with_those_options() -> None:
    client = etcd._Client(
        "192.0.2.1", 2379, credentials=None, username=None, password=None, timeout=2.0, dial_timeout=7.0
    )
    assert client._options["grpc.min_reconnect_backoff_ms"] == 7000
