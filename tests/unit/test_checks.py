"""The agent's rise/fall hysteresis."""

from agent.checks import RiseFall


def test_rise_needs_consecutive_passes():
    v = RiseFall(rise=3, fall=2)
    assert [v.observe(ok) for ok in (True, True, False, True, True)] == [False] * 5
    assert not v.healthy
    assert v.observe(True) and v.healthy


def test_fall_needs_consecutive_failures():
    v = RiseFall(rise=1, fall=3, healthy=True)
    assert not any(v.observe(ok) for ok in (False, False, True, False, False))
    assert v.healthy
    assert v.observe(False) and not v.healthy


def test_rise_one_flips_at_once():
    v = RiseFall(rise=1, fall=1)
    assert v.observe(True) and v.healthy
    assert v.observe(False) and not v.healthy
