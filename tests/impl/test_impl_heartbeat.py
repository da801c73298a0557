"""masknorm._heartbeat: a long step that says nothing gets a line every `every` seconds; one that reports
its own progress (said()) gets none until it falls silent; the thread says the due lines and stops with the step."""

import time

from masknorm._heartbeat import Heartbeat


def test_a_line_is_due_each_period_of_silence_and_said_postpones_it():
    beat = Heartbeat(print, "building", every=10)
    beat._start = beat._last = 100.0
    assert beat.beat(105.0) is None
    assert beat.beat(110.0) == "building: still running, 10 s"
    assert beat.beat(115.0) is None  # the heartbeat itself counts as said
    beat.said(118.0)
    assert beat.beat(125.0) is None
    assert beat.beat(128.5) == "building: still running, 28 s"


def test_what_is_read_when_the_line_is_due():
    state = {"now": "first"}
    beat = Heartbeat(print, lambda: state["now"], every=1)
    beat._start = beat._last = 0.0
    assert beat.beat(1.0).startswith("first:")
    state["now"] = "second"
    assert beat.beat(2.0).startswith("second:")


def test_the_thread_says_the_lines_while_the_step_runs_and_none_after():
    lines = []
    with Heartbeat(lines.append, "building", every=0.01):
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
    count = len(lines)
    time.sleep(0.1)
    assert count >= 1 and len(lines) == count
    assert lines[0].startswith("building: still running, ")


def test_while_quiet_says_a_line_after_a_silence_and_passes_the_steps_lines_through(capsys):
    from masknorm._heartbeat import while_quiet

    seen = ""
    with while_quiet("deriving", every=0.05):
        print("a step")
        deadline = time.monotonic() + 30
        while "still running" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
            seen += capsys.readouterr().out
        print("another step")
    seen += capsys.readouterr().out
    lines = seen.splitlines()
    assert lines[0] == "a step" and lines[1].startswith("deriving: still running, ") and "another step" in lines
