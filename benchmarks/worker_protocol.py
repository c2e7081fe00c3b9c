"""The JSON-lines protocol of the peer workers (bench_peers.py's Worker).

One JSON object per line on stdin, one JSON reply per line on stdout (logs
go to stderr). Every reply has "ok": true, or "ok": false and "error"; a
command that raises is reported to the parent instead of ending the worker.
{"cmd": "quit"} ends it. Imported by path (the workers run from this
directory in the side environments, without rlhf_jax installed).
"""

import json
import sys
import time
import traceback
from collections.abc import Callable


def reply(obj: dict) -> None:
  """Writes one reply line and flushes it."""
  sys.stdout.write(json.dumps(obj) + "\n")
  sys.stdout.flush()


def serve(
  commands: dict[str, Callable[[dict], dict]],
  on_quit: Callable[[], None] = lambda: None,
) -> None:
  """Answers commands from stdin until "quit" (``on_quit`` runs first) or
  the end of stdin."""
  for line in sys.stdin:
    line = line.strip()
    if not line:
      continue
    msg = json.loads(line)
    if msg.get("cmd") == "quit":
      on_quit()
      reply({"ok": True})
      return
    try:
      out = commands[msg["cmd"]](msg)
      out["ok"] = True
    except Exception as e:  # Report to the parent instead of dying.
      traceback.print_exc(file=sys.stderr)
      out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    reply(out)


def step_command(steps: dict) -> Callable[[dict], dict]:
  """The "step" command: runs ``steps[msg["name"]]()`` once (it returns
  when the work is done) and replies its wall seconds."""

  def step(msg: dict) -> dict:
    start = time.perf_counter()
    steps[msg["name"]]()
    return {"seconds": time.perf_counter() - start}

  return step
