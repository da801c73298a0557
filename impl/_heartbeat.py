"""A progress line for long steps that cannot report their own: whenever `every` seconds pass with
nothing said, `say(f"{what()}: still running, {elapsed} s")`. Used around the kernel build, each theorem of
`masknorm prove`, each step of `masknorm derive` and each property of `masknorm check`, so that no
long step stays silent for more than `every` seconds."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, Optional, TextIO, Union

EVERY_S = 10.0


class Heartbeat:
    """Context manager: a daemon thread says how long the step has run whenever `every` seconds have passed
    since the later of the start, the last heartbeat and the last `said()` (a progress line of the step's own)."""

    def __init__(self, say: Callable[[str], None], what: Union[str, Callable[[], str]], every: float = EVERY_S):
        self._say, self._what, self._every = say, (what if callable(what) else (lambda: what)), every
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start = self._last = 0.0

    def said(self, now: Optional[float] = None) -> None:
        """The step printed a line of its own: the next heartbeat is `every` seconds from now."""
        self._last = time.monotonic() if now is None else now

    def beat(self, now: float) -> Optional[str]:
        """The line due at time `now` (time.monotonic()), or None when something was said within `every` s."""
        if now - self._last < self._every:
            return None
        self._last = now
        return f"{self._what()}: still running, {now - self._start:.0f} s"

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self._last + self._every - time.monotonic())):
            line = self.beat(time.monotonic())
            if line is not None:
                self._say(line)

    def __enter__(self) -> "Heartbeat":
        self._start = self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="masknorm-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Watched:
    """A text stream that passes everything to `out` and tells the heartbeat each time something is written."""

    def __init__(self, out: TextIO, beat: Heartbeat):
        self._out, self._beat = out, beat

    def write(self, text: str) -> int:
        self._beat.said()
        return self._out.write(text)

    def flush(self) -> None:
        self._out.flush()


@contextlib.contextmanager
def while_quiet(what: str, every: float = EVERY_S) -> Iterator[None]:
    """Within the block, a heartbeat line on sys.stdout whenever nothing was printed to it for `every` seconds
    (a step's own progress lines postpone it)."""
    out = sys.stdout
    beat = Heartbeat(lambda line: print(line, file=out, flush=True), what, every)
    with beat, contextlib.redirect_stdout(_Watched(out, beat)):
        yield
