"""Children of the tests end when the test process that started them does.

A pytest stopped mid-run (Ctrl-C, a CI limit, `timeout`) would otherwise
leave its running `rlhf-jax` children to finish on their own, minutes of
both cores. Pass ``preexec_fn=die_with_parent(...)`` to subprocess.
"""

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Loaded in the parent: the preexec function runs between fork and exec,
# where loading a library is unsafe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent(sig: int = signal.SIGKILL):
  """A subprocess ``preexec_fn``: the child receives ``sig`` when the
  thread that started it exits (Linux prctl PR_SET_PDEATHSIG; elsewhere
  nothing). Use SIGTERM for a child that is ``timeout -k S``: timeout
  forwards it to its command and sends SIGKILL S seconds later (the setting
  does not pass to a forked grandchild)."""

  def preexec():
    if _LIBC is not None:
      _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

  return preexec
