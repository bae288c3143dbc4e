"""How busy a scoring actor keeps its device: its time from the first call on goes to the device (forwards) or to
what the device waited for (decode, input rows, the host), one state at a time even with two calls at once; the
summary says what starved the device below 90% and what to change; the progress line shows it."""

from __future__ import annotations

import io

import pytest

from pipeline.runner.progress import Progress
from pipeline.scoring.duty_cycle import DutyCycle, lines, summary


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_goes_to_the_device_or_to_what_it_waited_for():
    clock = Clock()
    duty = DutyCycle(clock=clock)
    clock.now = 5.0  # before the first call: set-up, not counted
    with duty.call():
        clock.now = 6.0  # planning: the host
        with duty.waiting_for_decode():
            clock.now = 8.0
        with duty.forward():
            clock.now = 11.0
        clock.now = 11.5  # records built: the host
    clock.now = 15.5  # no call under way: waiting for input rows
    with duty.call():
        with duty.forward():
            clock.now = 16.5
    assert duty.snapshot() == pytest.approx({"wall_s": 11.5, "busy_s": 4.0, "decode_s": 2.0, "input_s": 4.0,
                                             "host_s": 1.5})


def test_a_forward_of_one_call_keeps_the_device_busy_while_the_other_waits_for_decode():
    clock = Clock()
    duty = DutyCycle(clock=clock)
    first, second = duty.call(), duty.call()
    first.__enter__()
    forward = duty.forward()
    forward.__enter__()
    second.__enter__()
    waiting = duty.waiting_for_decode()
    waiting.__enter__()  # the second call waits for its images while the first call's micro-batch runs
    clock.now = 3.0
    forward.__exit__(None, None, None)
    clock.now = 4.0  # now the device waits for the second call's images
    waiting.__exit__(None, None, None)
    second.__exit__(None, None, None)
    first.__exit__(None, None, None)
    assert duty.snapshot() == pytest.approx({"wall_s": 4.0, "busy_s": 3.0, "decode_s": 1.0, "input_s": 0.0,
                                             "host_s": 0.0})


def test_the_warm_up_is_forgotten():
    clock = Clock()
    duty = DutyCycle(clock=clock)
    with duty.call(), duty.forward():
        clock.now = 30.0
    duty.reset()
    clock.now = 40.0
    with duty.call(), duty.forward():
        clock.now = 41.0
    assert duty.snapshot()["wall_s"] == pytest.approx(1.0)


def snapshot(busy: float, decode: float = 0.0, input_: float = 0.0, host: float = 0.0) -> dict:
    return {"wall_s": busy + decode + input_ + host, "busy_s": busy, "decode_s": decode, "input_s": input_,
            "host_s": host}


def test_below_90_percent_the_summary_says_what_starved_the_device_and_what_to_change():
    busy = summary([snapshot(60, decode=30, input_=6, host=4), snapshot(80, decode=10, input_=5, host=5)])
    assert busy["pct"] == 70.0 and busy["lowest_actor_pct"] == 60.0 and busy["actors"] == 2
    assert busy["waiting_pct"] == {"decode": 20.0, "input": 5.5, "host": 4.5}
    assert busy["starved_by"] == "decode"
    assert "cpus_per_actor" in busy["advice"] and "jpeg_draft" in busy["advice"] and "nvjpeg" in busy["advice"]
    said = lines(busy)
    assert "below 90%: 20% of the time waiting for its images to be decoded" in said[0]
    assert said[1] == f"to change it: {busy['advice']}"


@pytest.mark.parametrize(("waits", "cause", "field"), [({"input_": 30}, "input", "read_workers"),
                                                       ({"host": 30}, "host", "token_budget")])
def test_each_cause_names_the_settings_that_change_it(waits, cause, field):
    busy = summary([snapshot(70, **waits)])
    assert busy["starved_by"] == cause and field in busy["advice"]


def test_a_device_busy_90_percent_of_the_time_needs_no_advice():
    busy = summary([snapshot(95, decode=5)])
    assert busy["pct"] == 95.0 and busy["starved_by"] is None and busy["advice"] is None
    assert lines(busy) == ["busy 95% of the scoring actors' time"]


def test_the_progress_line_carries_the_jobs_note():
    stream = io.StringIO()
    bar = Progress("score", 4, stream=stream, note=lambda: "device busy 87%")
    bar.update(1, 10, 0, force=True)
    assert stream.getvalue().rstrip().endswith("· device busy 87%")
