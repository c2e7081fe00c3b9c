"""child_procs.die_with_parent: a test's children end with the test."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

# A parent that starts `sleep 300` (under `timeout -k 1 300` when asked)
# with die_with_parent, prints the sleep's pid once setpriv has exec'd it
# (or timeout), and waits to be killed.
_PARENT = """
import signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from child_procs import die_with_parent
bound = sys.argv[2] == "timeout"
cmd = ["timeout", "-k", "1", "300"] * bound + ["sleep", "300"]
sig = signal.SIGTERM if bound else signal.SIGKILL
child = subprocess.Popen([*die_with_parent(sig), *cmd])
pid = "" if bound else str(child.pid)
deadline = time.monotonic() + 30
while not pid and time.monotonic() < deadline:  # timeout's own child
  found = subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True)
  pid = found.stdout.decode().strip()
  time.sleep(0.05)
# setpriv sets the death signal, then execs: until the program is sleep
# (or timeout), a parent killed at once would leave it running.
exe = "timeout" if bound else "sleep"
comm = lambda: open(f"/proc/{child.pid}/comm").read().strip()
while comm() != exe and time.monotonic() < deadline:
  time.sleep(0.01)
print(pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except (FileNotFoundError, ProcessLookupError):  # gone (or going) at read
    return False


@pytest.mark.skipif(
  shutil.which("setpriv") is None, reason="needs util-linux's setpriv"
)
@pytest.mark.parametrize("bound", ["direct", "timeout"])
def test_children_end_when_their_parent_is_killed(bound):
  here = os.path.dirname(__file__)
  parent = subprocess.Popen(
    [sys.executable, "-c", _PARENT, here, bound],
    stdout=subprocess.PIPE,
    text=True,
  )
  pid = int(parent.stdout.readline())
  try:
    assert _alive(pid)
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not _alive(pid)
  finally:
    parent.kill()
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)
