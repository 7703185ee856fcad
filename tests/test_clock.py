from __future__ import annotations

import threading
import time

import pytest

from ai_guard.clock import SYSTEM_CLOCK, Clock, is_testing, set_testing
from ai_guard.testing import FakeClock


def test_fake_clock_sleep_advances_time_and_records() -> None:
    clock = FakeClock(start=100.0)
    clock.sleep(2.5)
    clock.sleep(-1)  # negative sleeps are zero
    assert clock.monotonic() == 102.5
    assert clock.sleeps == [2.5, 0.0]
    assert clock.total_slept == 2.5


def test_fake_clock_wall_time_moves_with_monotonic() -> None:
    clock = FakeClock(start=0.0, wall_start=1_700_000_000.0)
    clock.advance(10)
    assert clock.time() == 1_700_000_010.0


def test_fake_clock_refuses_to_go_backwards() -> None:
    with pytest.raises(ValueError, match="backwards"):
        FakeClock().advance(-1)


def test_fake_clock_is_thread_safe() -> None:
    clock = FakeClock(start=0.0)

    def sleeper() -> None:
        for _ in range(1000):
            clock.sleep(0.001)

    threads = [threading.Thread(target=sleeper) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(clock.sleeps) == 16_000
    assert clock.monotonic() == pytest.approx(16.0)


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(SYSTEM_CLOCK, Clock)
    assert isinstance(FakeClock(), Clock)


def test_testing_mode_zeroes_real_sleeps() -> None:
    set_testing(True)
    assert is_testing()
    started = time.monotonic()
    SYSTEM_CLOCK.sleep(5)
    assert time.monotonic() - started < 1.0
    set_testing(False)
    assert not is_testing()


def test_system_clock_sleeps_for_real_when_not_testing() -> None:
    started = time.monotonic()
    SYSTEM_CLOCK.sleep(0.01)
    assert time.monotonic() - started >= 0.009
