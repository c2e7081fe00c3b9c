"""Environment variables jax reads when it is imported, checked first.

jax parses ``$JAX_NUM_CPU_DEVICES`` as it is imported, and a value that is
not an integer raises from inside ``import jax``: before the ``rlhf-jax``
command can turn it into its one-line error. ``rlhf_jax/__init__.py``
imports this module ahead of every other, and importing it runs
`check_before_jax`.
"""

import os
import sys

COMMAND = "rlhf-jax"
# python -m NAME runs the command
_MODULES = ("rlhf_jax", "rlhf_jax.__main__", "rlhf_jax.cli.main")
# jax starts every CPU device it is asked for: 4096 took 21 s and 1.4 GB on
# a 2-core host, 100000 never finished.
MAX_CPU_DEVICES = 4096


def _device_count() -> tuple[str | None, int | None]:
  """($JAX_NUM_CPU_DEVICES, its integer value or None if it has none)."""
  value = os.environ.get("JAX_NUM_CPU_DEVICES")
  try:
    return value, None if value is None else int(value)
  except ValueError:
    return value, None


def bad_device_count() -> str | None:
  """$JAX_NUM_CPU_DEVICES that jax would refuse at import (not an integer),
  fail on later (0 or below, other than -1: no CPU backend) or not start
  in reasonable time (above MAX_CPU_DEVICES), as one line; None when unset
  or fine."""
  value, count = _device_count()
  if count is not None and count > MAX_CPU_DEVICES:
    return (
      f"$JAX_NUM_CPU_DEVICES={value!r}: expected at most {MAX_CPU_DEVICES} "
      "CPU devices (jax starts each one; that many would not start in "
      "reasonable time)"
    )
  if value is None or (count is not None and (count >= 1 or count == -1)):
    return None
  return (
    f"$JAX_NUM_CPU_DEVICES={value!r}: expected a number of CPU devices >= 1 "
    "(or -1, jax's default)"
  )


def _in_command() -> bool:
  """Whether this process is the command (not a library import).

  The ``rlhf-jax`` script, or ``python -m rlhf_jax`` (or
  ``rlhf_jax.cli.main``): argv[0] is
  "-m" while the package is imported, and ``sys.orig_argv`` keeps the
  module's name (``-m NAME`` or ``-mNAME``) among the interpreter's own
  options, before any script or ``-c`` (whose arguments are not read).
  """
  if os.path.basename(sys.argv[0] if sys.argv else "") == COMMAND:
    return True
  argv, i = list(getattr(sys, "orig_argv", [])), 1
  while i < len(argv):
    a = argv[i]
    if a.startswith("-m"):
      return (a[2:] or "".join(argv[i + 1 : i + 2])) in _MODULES
    if a in ("-c", "-") or not a.startswith("-"):
      return False  # a command string or a script: not ours
    i += 2 if a in ("-X", "-W") else 1  # those two take a value
  return False


def check_before_jax() -> None:
  """Refuses a $JAX_NUM_CPU_DEVICES that would make ``import jax`` raise.

  In the ``rlhf-jax`` command (``_in_command``) that is
  its one-line error and exit code 2; a library import gets a ValueError
  naming the variable. Other bad values are left to the command's own
  check (`bad_device_count`) and to jax.

  Raises:
    ValueError: as above, outside the command.
  """
  value, count = _device_count()
  if value is None or count is not None:
    return
  problem = bad_device_count()
  if _in_command():
    sys.stderr.write(f"{COMMAND}: error: {problem}\n")
    sys.exit(2)
  raise ValueError(problem)


check_before_jax()
