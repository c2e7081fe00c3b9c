"""Progress display for long stages: a rich bar on a terminal, log lines off.

Progress goes to stderr; stdout keeps a command's log lines and figures. On
a TTY, ``ProgressBar`` shows a rich progress bar with done/total, elapsed
time, ETA and a few key metrics, redrawn in place. When the stream is not
a TTY (CI logs, ``| tee``, a file), redrawing would fill the log with
carriage returns, so it prints plain, complete lines instead:

  ppo: 10/50 (20%) elapsed 0:00:31 eta 0:01:40 | objective/kl=0.81 ...

at the first update, every ``log_every`` steps (default: a tenth of the
total), at least every ``log_interval_s`` seconds of progress, and at the
end. The plain ETA uses the rate measured after the first update, so the
first step's compile time does not inflate it.
"""

import datetime
import math
import sys
import time
import types
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np


def _isatty(stream: Any) -> bool:
  isatty = getattr(stream, "isatty", None)
  return bool(isatty and isatty())


def format_metrics(metrics: Mapping[str, Any], *, max_items: int) -> str:
  """``key=value`` pairs, 4 significant digits, the first ``max_items``."""
  parts = []
  for key, value in list(metrics.items())[:max_items]:
    v = np.asarray(value)
    if v.size == 1 and v.dtype.kind in "iub":
      parts.append(f"{key}={int(v.reshape(()))}")
    elif v.size == 1 and v.dtype.kind == "f":
      parts.append(f"{key}={float(v.reshape(())):.4g}")
    else:
      parts.append(f"{key}={value}")
  return " ".join(parts)


def _hms(seconds: float) -> str:
  # timedelta overflows past ~3e15 s (a --steps of 1e20 gives such ETAs).
  if not math.isfinite(seconds) or abs(seconds) > 1e12:
    return "?"
  return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class ProgressBar:
  """Progress of one stage: ``update(n, metrics)`` after each unit of work."""

  def __init__(
    self,
    total: int,
    description: str,
    *,
    stream: TextIO | None = None,
    tty: bool | None = None,
    log_every: int | None = None,
    log_interval_s: float = 60.0,
    max_metrics: int = 4,
    show: bool = True,
  ) -> None:
    """Starts the display.

    Args:
      total: number of units (steps, iterations, batches), >= 0.
      description: stage name shown before the bar.
      stream: where to draw; defaults to sys.stderr at construction time
        (as tqdm's bars: stdout keeps the command's log lines).
      tty: force the rich bar (True) or plain lines (False); default:
        ``stream.isatty()``.
      log_every: plain mode: print every this many units (default
        ceil(total / 10)).
      log_interval_s: plain mode: also print when this much time passed
        since the last line.
      max_metrics: how many metrics (first in dict order) to show.
      show: False draws nothing (the units are still counted), e.g. for
        work of one unit.

    Raises:
      ValueError: if total is negative.
    """
    if total < 0:
      raise ValueError(f"total must be >= 0, got {total}")
    self.total = int(total)
    self.description = description
    self.done = 0
    self._stream = sys.stderr if stream is None else stream
    self._show = show
    self.tty = show and (_isatty(self._stream) if tty is None else tty)
    self._max_metrics = max_metrics
    self._log_every = log_every or max(1, math.ceil(self.total / 10))
    self._log_interval_s = log_interval_s
    self._metrics_text = ""
    self._closed = False
    self._t0 = time.monotonic()
    self._first: tuple[float, int] | None = None  # (time, done) at update 1
    self._last_line_t = self._t0
    self._last_line_done = -1
    self._progress = None
    if self.tty:
      from rich.console import Console
      from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
      )

      self._progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=Console(file=self._stream, force_terminal=True),
        # Prints to stdout are drawn above the bar only when they would
        # reach the same terminal: a bar on stderr must not take a piped
        # or redirected stdout's lines.
        redirect_stdout=self._stream is sys.stdout or _isatty(sys.stdout),
        redirect_stderr=self._stream is sys.stderr or _isatty(sys.stderr),
      )
      self._task = self._progress.add_task(
        description, total=self.total, metrics=""
      )
      self._progress.start()

  def update(
    self, n: int = 1, metrics: Mapping[str, Any] | None = None
  ) -> None:
    """Advances by ``n`` units and shows ``metrics`` (scalars) if given."""
    if self._closed:
      raise ValueError("ProgressBar is closed")
    now = time.monotonic()
    self.done += n
    if metrics:
      self._metrics_text = format_metrics(metrics, max_items=self._max_metrics)
    if self._progress is not None:
      self._progress.update(self._task, advance=n, metrics=self._metrics_text)
      return
    if not self._show:
      return
    first_update = self._first is None
    if first_update:
      self._first = (now, self.done)
    # A multiple of log_every was reached since the last line.
    crossed = (
      self.done // self._log_every > self._last_line_done // self._log_every
    )
    if (
      first_update
      or crossed
      or self.done >= self.total
      or now - self._last_line_t >= self._log_interval_s
    ):
      self._print_line(now)

  def eta_seconds(self, now: float | None = None) -> float:
    """Plain-mode ETA from the rate after the first update (inf if unknown)."""
    now = time.monotonic() if now is None else now
    if self._first is None or self.done <= self._first[1]:
      return math.inf
    rate = (self.done - self._first[1]) / max(now - self._first[0], 1e-9)
    return max(self.total - self.done, 0) / rate

  def _print_line(self, now: float) -> None:
    pct = 100.0 * self.done / self.total if self.total else 100.0
    line = (
      f"{self.description}: {self.done}/{self.total} ({pct:.0f}%) "
      f"elapsed {_hms(now - self._t0)} eta {_hms(self.eta_seconds(now))}"
    )
    if self._metrics_text:
      line += f" | {self._metrics_text}"
    self._stream.write(line + "\n")
    self._stream.flush()
    self._last_line_t = now
    self._last_line_done = self.done

  def close(self) -> None:
    """Stops the bar; plain mode prints a last line if the last was stale."""
    if self._closed:
      return
    self._closed = True
    if self._progress is not None:
      self._progress.stop()
    elif self._show and self._last_line_done != self.done:
      self._print_line(time.monotonic())

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: types.TracebackType | None,
  ) -> None:
    self.close()
