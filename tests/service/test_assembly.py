"""Series assembly: completion after a quiet period, once, re-armed by late instances."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from cinesr.service.assembly import SeriesAssembler
from cinesr.service.store import StoredInstance


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, stable: float = 10.0) -> tuple[SeriesAssembler, list[tuple[str, str]]]:
    completed: list[tuple[str, str]] = []
    assembler = SeriesAssembler(stable, lambda study, series: completed.append((study, series)), clock=clock)
    return assembler, completed


def test_series_completes_only_after_quiet_period(clock: FakeClock) -> None:
    assembler, completed = make(clock)
    for _ in range(5):
        assembler.instance_arrived("1.1", "1.1.1")
        clock.advance(3)  # arrivals 3 s apart keep it open
        assert assembler.poll() == []
    assert completed == []
    assert assembler.pending() == {"1.1.1": ("1.1", 5)}
    clock.advance(6.9)  # 9.9 s since the last arrival
    assert assembler.poll() == [] and completed == []
    clock.advance(0.1)
    assert assembler.poll() == [("1.1", "1.1.1")]
    assert completed == [("1.1", "1.1.1")]


def test_completion_is_reported_once(clock: FakeClock) -> None:
    assembler, completed = make(clock)
    assembler.instance_arrived("1.1", "1.1.1")
    clock.advance(11)
    assembler.poll()
    clock.advance(100)
    assert assembler.poll() == []
    assert completed == [("1.1", "1.1.1")]
    assert assembler.pending() == {}
    assert assembler.next_due() is None


def test_late_instance_rearms_the_series(clock: FakeClock) -> None:
    assembler, completed = make(clock)
    assembler.instance_arrived("1.1", "1.1.1")
    clock.advance(10)
    assembler.poll()
    clock.advance(60)
    assembler.instance_arrived("1.1", "1.1.1")  # a re-send or a late image
    assert assembler.next_due() == pytest.approx(clock.now + 10)
    clock.advance(5)
    assert assembler.poll() == []
    clock.advance(5)
    assert assembler.poll() == [("1.1", "1.1.1")]
    assert completed == [("1.1", "1.1.1"), ("1.1", "1.1.1")]


def test_series_are_independent(clock: FakeClock) -> None:
    assembler, completed = make(clock, stable=2)
    assembler.instance_arrived("1.1", "1.1.1")
    clock.advance(1)
    assembler.instance_arrived("1.1", "1.1.2")
    clock.advance(1)
    assert assembler.poll() == [("1.1", "1.1.1")]
    clock.advance(1)
    assert assembler.poll() == [("1.1", "1.1.2")]
    assert completed == [("1.1", "1.1.1"), ("1.1", "1.1.2")]


def test_failing_consumer_does_not_block_other_series(clock: FakeClock) -> None:
    seen: list[str] = []

    def on_complete(study: str, series: str) -> None:
        seen.append(series)
        if series == "1.1.1":
            raise RuntimeError("consumer bug")

    assembler = SeriesAssembler(1, on_complete, clock=clock)
    assembler.instance_arrived("1.1", "1.1.1")
    assembler.instance_arrived("1.1", "1.1.2")
    clock.advance(1)
    assert sorted(series for _study, series in assembler.poll()) == ["1.1.1", "1.1.2"]
    assert sorted(seen) == ["1.1.1", "1.1.2"]


def test_store_callback_adapter_and_zero_stable_seconds(clock: FakeClock) -> None:
    assembler, completed = make(clock, stable=0)
    assembler.on_instance(StoredInstance("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.4", "MR",
                                         "1.2.840.10008.1.2.1", Path("x.dcm")))
    assert assembler.poll() == [("1.2", "1.2.3")]
    with pytest.raises(ValueError):
        SeriesAssembler(-1, lambda a, b: None)


def test_background_thread_with_real_clock() -> None:
    done = threading.Event()
    completed: list[tuple[str, str]] = []

    def on_complete(study: str, series: str) -> None:
        completed.append((study, series))
        done.set()

    assembler = SeriesAssembler(0.3, on_complete)
    assembler.start()
    try:
        start = time.monotonic()
        assembler.instance_arrived("9.9", "9.9.9")
        assert done.wait(5)
        assert time.monotonic() - start >= 0.3
        assert completed == [("9.9", "9.9.9")]
    finally:
        assembler.stop()


def test_stop_with_flush_completes_pending(clock: FakeClock) -> None:
    assembler, completed = make(clock, stable=600)
    assembler.instance_arrived("1.1", "1.1.1")
    assembler.stop(flush=True)
    assert completed == [("1.1", "1.1.1")]
