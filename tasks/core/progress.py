"""Progress for long loops (training steps, evaluation rows), on stderr.

    with progress(total=steps, desc="train qlora", unit="step", initial=resumed_at) as bar:
        for step in ...:
            bar.update(1, loss=0.512, **{"tok/s": 1234.5})

On a terminal (stderr is a TTY) it is a live tqdm bar (count, rate, ETA, the postfix as k=v). Anywhere
else (a file, CI, a Prefect worker's log) it is a plain line every ~10 % and one at the end, never a
carriage return:

    train qlora: 40% 16/40 loss=0.51 tok/s=1.23e+03 0.52 step/s eta 1m20s

QLORA_OPS_PROGRESS picks the mode: `auto` (default: bar on a TTY, lines otherwise), `bar`, `lines`, or
`off` (also `0`, `false`, `no`: nothing is written). Nothing happens at import.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

ENV = "QLORA_OPS_PROGRESS"
EVERY_PCT = 10  # non-TTY: one line per this many percent


def mode() -> str:
    """'bar', 'lines' or 'off', from QLORA_OPS_PROGRESS and whether stderr is a terminal."""
    v = os.environ.get(ENV, "auto").strip().lower()
    if v in ("off", "0", "false", "no", "none"):
        return "off"
    if v in ("bar", "tty"):
        return "bar"
    if v in ("lines", "line", "plain"):
        return "lines"
    try:
        return "bar" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return "lines"


def fmt_value(v: Any) -> str:
    """Short: 0.512 -> '0.512', 1234.5 -> '1234', 3 -> '3', 1e-05 -> '1e-05'."""
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_duration(s: float) -> str:
    if s < 10:
        return f"{max(s, 0):.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A progress display; see the module docstring. Use `progress(...)` to make one."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, how: str | None = None):
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.n = self.initial = int(initial)
        self.postfix: dict[str, str] = {}
        self.how = how or mode()
        self._t0 = time.monotonic()
        self._closed = False
        self._bar = None
        self._last_printed: int | None = None
        self._next_pct = self._pct_step_after(self._pct())
        if self.how == "bar":
            from tqdm.auto import tqdm

            try:  # a pseudo-terminal without a size (0 columns) would get an empty bar
                sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
            except (OSError, ValueError, AttributeError):
                sized = False
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, initial=self.initial, file=sys.stderr,
                             dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                             leave=True, disable=False)  # ours, even where TQDM_DISABLE silences third-party bars

    # ------------------------------------------------------------ public
    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._closed:
            return
        self.n += n
        if postfix:
            self.postfix.update({k: fmt_value(v) for k, v in postfix.items()})
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
        elif self.how == "lines":
            pct = self._pct()
            if pct >= self._next_pct or (self.total and self.n >= self.total):
                self._emit()
                self._next_pct = self._pct_step_after(pct)

    def close(self) -> None:
        """Ends the display; in line mode writes the final state if the last line did not show it."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.how == "lines" and self._last_printed != self.n and self.n > self.initial:
            self._emit()

    def line(self) -> str:
        """The plain-text line for the current state (what line mode writes)."""
        elapsed = time.monotonic() - self._t0
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        parts = [f"{self.desc}: {self._pct():.0f}% {self.n}/{self.total}" if self.total else f"{self.desc}: {self.n}"]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        if rate is not None:
            parts.append(f"{fmt_value(rate)} {self.unit}/s")
        if self.total and self.n >= self.total:
            parts.append(f"in {fmt_duration(elapsed)}")
        elif rate and self.total:
            parts.append(f"eta {fmt_duration((self.total - self.n) / rate)}")
        return " ".join(parts)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._bar is None:
            self._closed = True  # a failure: its own message says what happened, not a last progress line
        self.close()

    # ------------------------------------------------------------ internals
    def _pct(self) -> float:
        return 100.0 * self.n / self.total if self.total else 0.0

    @staticmethod
    def _pct_step_after(pct: float) -> float:
        return (math.floor(pct / EVERY_PCT) + 1) * EVERY_PCT

    def _emit(self) -> None:
        self._last_printed = self.n
        # write(), not print(): inside a Prefect task with log_prints, print(file=sys.stderr) becomes a log record
        sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()


def progress(total: int, desc: str, unit: str = "it", initial: int = 0) -> Progress:
    """A context manager showing progress on stderr: a tqdm bar on a TTY, else a line every ~10 %;
    nothing with QLORA_OPS_PROGRESS=off."""
    return Progress(total, desc, unit, initial)
