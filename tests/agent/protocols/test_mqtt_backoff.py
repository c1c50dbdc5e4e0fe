"""`agent.protocols.mqtt.backoff_s`: the reconnect delay of the publisher, the edge and the cluster
worker doubles up to its cap, with jitter, for any number of failures."""

from __future__ import annotations

import random

import pytest

from agent.protocols.mqtt import backoff_s


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The top of the jitter range (100 %)."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


@pytest.mark.usefixtures("no_jitter")
def test_doubles_from_min_up_to_max() -> None:
    delays = [backoff_s(failures, 0.5, 30.0) for failures in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


@pytest.mark.usefixtures("no_jitter")
@pytest.mark.parametrize("failures", [1024, 1025, 1026, 5000, 10**6, 10**100])
def test_any_number_of_failures_gives_the_cap(failures: int) -> None:
    """2 ** 1024 no longer fits a float: a broker away for a long time (about 1025 failed
    attempts) must not raise OverflowError in the reconnect loop, which would end it."""
    assert backoff_s(failures, 0.5, 30.0) == 30.0
    assert backoff_s(failures, 1e-9, 1e9) == 1e9


@pytest.mark.usefixtures("no_jitter")
@pytest.mark.parametrize("failures", [0, -1, -(10**6)])
def test_no_failure_yet_waits_the_minimum(failures: int) -> None:
    assert backoff_s(failures, 0.5, 30.0) == 0.5


def test_jitter_stays_within_80_to_100_percent() -> None:
    random.seed(1234)
    for failures in (1, 3, 2000):
        base = min(30.0, 0.5 * 2.0 ** min(failures - 1, 100))
        delays = [backoff_s(failures, 0.5, 30.0) for _ in range(200)]
        assert all(0.8 * base <= d <= base for d in delays)
        assert max(delays) - min(delays) > 0.1 * base  # it does vary: clients don't retry in step
