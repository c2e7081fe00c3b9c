"""Children of the tests end when the test process that started them does.

A pytest stopped mid-run (Ctrl-C, a CI limit, `timeout`) would otherwise
leave its running `rlhf-jax` children to finish on their own, minutes of
both cores. Start them as ``[*die_with_parent(), *cmd]``.
"""

import shutil
import signal

# util-linux's setpriv sets the parent-death signal (Linux prctl
# PR_SET_PDEATHSIG) and execs the command, which keeps it: no Python runs
# in the forked child (a preexec_fn would, in a process with JAX threads).
_SETPRIV = shutil.which("setpriv")


def die_with_parent(sig: int = signal.SIGKILL) -> list[str]:
  """A command prefix: the command receives ``sig`` when the thread that
  started it exits (nothing where util-linux's setpriv is missing). Use
  SIGTERM before ``timeout -k S``: timeout forwards it to its command and
  sends SIGKILL S seconds later (the setting does not pass to a forked
  grandchild)."""
  if _SETPRIV is None:
    return []
  name = signal.Signals(sig).name.removeprefix("SIG")
  return [_SETPRIV, "--pdeathsig", name, "--"]
