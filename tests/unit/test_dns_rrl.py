"""Response Rate Limiting: rate, window, slip, prefixes, accounts, exemptions."""

from __future__ import annotations

from collections import Counter

from dnsd.config import RRLConfig
from dnsd.rrl import DROP, SEND, SLIP, RateLimiter, SharedRateLimiter
from dnsd.shared import rrl_buckets


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter(clock: Clock, **kw: object) -> RateLimiter:
    cfg = RRLConfig(**{"responses_per_second": 10, "window": 3, "slip": 2, **kw})  # type: ignore[arg-type]
    return RateLimiter(cfg, clock)


def burst(rrl: RateLimiter, n: int, host: str = "192.0.2.1", key: bytes = b"www") -> Counter[int]:
    return Counter(rrl.check(host, key) for _ in range(n))


def test_up_to_the_rate_everything_is_sent() -> None:
    rrl = limiter(Clock())
    assert burst(rrl, 10) == {SEND: 10}


def test_over_the_rate_every_second_limited_answer_slips() -> None:
    rrl = limiter(Clock(), slip=2)
    got = burst(rrl, 110)
    assert got == {SEND: 10, SLIP: 50, DROP: 50}
    assert rrl.dropped == 50 and rrl.slipped == 50


def test_slip_zero_always_drops_and_slip_one_always_truncates() -> None:
    assert burst(limiter(Clock(), slip=0), 30) == {SEND: 10, DROP: 20}
    assert burst(limiter(Clock(), slip=1), 30) == {SEND: 10, SLIP: 20}


def test_credit_comes_back_at_the_rate_per_second() -> None:
    clock = Clock()
    rrl = limiter(clock)
    burst(rrl, 10)
    clock.t += 1
    rrl.tick()
    assert burst(rrl, 10) == {SEND: 10}
    assert burst(rrl, 1)[SEND] == 0


def test_a_flooder_stays_limited_for_the_window_after_stopping() -> None:
    clock = Clock()
    rrl = limiter(clock, window=3)
    burst(rrl, 500)  # deep in debt: the balance is floored at -window * rate
    for _ in range(2):
        clock.t += 1
        rrl.tick()
        assert burst(rrl, 1)[SEND] == 0
    clock.t += 2
    rrl.tick()
    assert burst(rrl, 1) == {SEND: 1}


def test_one_prefix_is_limited_while_others_are_not() -> None:
    rrl = limiter(Clock())
    burst(rrl, 100, host="192.0.2.7")
    assert burst(rrl, 5, host="192.0.2.200")[SEND] == 0  # same /24
    assert burst(rrl, 5, host="192.0.3.7") == {SEND: 5}  # another /24
    assert burst(rrl, 5, host="192.0.2.7", key=b"mail") == {SEND: 5}  # another answer


def test_ipv6_clients_are_grouped_by_56() -> None:
    rrl = limiter(Clock())
    burst(rrl, 100, host="2001:db8:0:ff00::1")
    assert burst(rrl, 5, host="2001:db8:0:ffaa::9")[SEND] == 0  # same /56
    assert burst(rrl, 5, host="2001:db8:0:fe00::1") == {SEND: 5}


def test_other_prefix_lengths() -> None:
    rrl = limiter(Clock(), ipv4_prefix=32)
    burst(rrl, 100, host="192.0.2.7")
    assert burst(rrl, 5, host="192.0.2.8") == {SEND: 5}
    rrl = limiter(Clock(), ipv4_prefix=16)
    burst(rrl, 100, host="192.0.2.7")
    assert burst(rrl, 5, host="192.0.99.8")[SEND] == 0


def test_exempt_networks_are_never_limited() -> None:
    rrl = limiter(Clock(), exempt=["192.0.2.0/24", "2001:db8::/32"])
    assert burst(rrl, 100, host="192.0.2.1") == {SEND: 100}
    assert burst(rrl, 100, host="2001:db8::1") == {SEND: 100}
    assert burst(rrl, 100, host="198.51.100.1")[SEND] == 10


def test_account_table_stays_bounded_and_keeps_the_limited() -> None:
    rrl = limiter(Clock(), max_accounts=50)
    burst(rrl, 100, host="10.9.9.9")  # limited
    for i in range(200):
        rrl.check(f"10.{i // 256}.{i % 256}.1", b"www")
    assert len(rrl.accounts) <= 50
    assert burst(rrl, 1, host="10.9.9.9")[SEND] == 0  # still remembered as limited


def shared_pair(clock: Clock, **kw: object) -> tuple[SharedRateLimiter, SharedRateLimiter]:
    """Two limiters over one bucket array: two workers of one node."""
    cfg = RRLConfig(**{"responses_per_second": 10, "window": 3, "slip": 2, **kw})  # type: ignore[arg-type]
    buckets = memoryview(bytearray(rrl_buckets(cfg.max_accounts) * 4 * 8)).cast("q")
    salt = b"s" * 16
    return SharedRateLimiter(cfg, buckets, salt, clock), SharedRateLimiter(cfg, buckets, salt, clock)


def test_workers_sharing_accounts_limit_a_client_once() -> None:
    clock = Clock()
    a, b = shared_pair(clock)
    got = Counter(rrl.check("192.0.2.1", b"www") for rrl in [a, b] * 55)
    assert got == {SEND: 10, SLIP: 50, DROP: 50}  # what one limiter gives for 110 responses
    assert a.dropped + b.dropped == 50 and a.slipped + b.slipped == 50
    clock.t += 1  # one second later: `rate` more credit, whichever worker spends it
    assert Counter(b.check("192.0.2.1", b"www") for _ in range(15))[SEND] == 0  # still in debt
    clock.t += 10
    a.tick(), b.tick()
    assert Counter(a.check("192.0.2.7", b"www") for _ in range(10)) == {SEND: 10}  # same /24


def test_shared_accounts_keep_prefixes_and_keys_apart() -> None:
    a, b = shared_pair(Clock(), slip=0)
    assert Counter(a.check("192.0.2.1", b"www") for _ in range(20)) == {SEND: 10, DROP: 10}
    assert Counter(b.check("198.51.100.1", b"www") for _ in range(10)) == {SEND: 10}
    assert Counter(b.check("192.0.2.1", b"mail") for _ in range(10)) == {SEND: 10}
    assert b.check("192.0.2.1", b"") == SEND  # a valid server cookie: never limited


def test_blocks_of_supervisors_that_are_gone_are_removed_at_the_next_start(tmp_path):
    """A SIGKILLed supervisor cannot unlink its block; the next dnsd to start removes it."""
    import multiprocessing
    import os
    import subprocess
    import sys

    from dnsd import shared

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / f"{shared.PREFIX}{gone.pid}-abc123"
    orphan.write_bytes(b"x")
    alive = tmp_path / f"{shared.PREFIX}{os.getpid()}-def456"
    alive.write_bytes(b"x")
    other = tmp_path / "carousel-dnsd-notapid"
    other.write_bytes(b"x")
    assert shared.remove_orphans(str(tmp_path)) == [str(orphan)]
    assert not orphan.exists() and alive.exists() and other.exists()

    block = shared.NodeShared.create(64, multiprocessing.get_context("spawn").Lock())
    try:
        assert os.path.basename(block.spec.path).startswith(f"{shared.PREFIX}{os.getpid()}-")
    finally:
        block.close()
        block.unlink()
