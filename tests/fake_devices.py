"""XLA flags for fake CPU devices, shared by the tests and their children.

The collective timeouts are raised because with 8 fake devices on 2 cores
under a parallel test run, one device thread can reach a rendezvous long
after the others; XLA's default then aborts the whole process (a crashed
pytest worker, no Python traceback). A real deadlock is still bounded by
the tests' own time limits.
"""

_TIMEOUTS = (
  "--xla_cpu_collective_call_terminate_timeout_seconds=1800"
  " --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
  " --xla_cpu_collective_timeout_seconds=1800"
)


def xla_flags(devices: int) -> str:
  """``XLA_FLAGS`` for ``devices`` fake CPU devices with long timeouts."""
  return f"--xla_force_host_platform_device_count={devices} {_TIMEOUTS}"
