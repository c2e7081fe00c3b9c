"""orbax's event loop, closed only after every task on it has finished.

orbax-checkpoint (0.12) runs each save and restore on a fresh event loop
(``asyncio_utils._run_sync_via_new_loop``) and closes that loop as soon as
the main coroutine returns or raises. When one array of a damaged
checkpoint fails to read, the reads of the other arrays are still running:
TensorStore then calls back into the closed loop from its threads ("Event
loop is closed" tracebacks printed from C++), asyncio reports "Task
exception was never retrieved", and a coroutine abandoned half-way prints
"Exception ignored in" when it is collected. The damage itself is already
reported (``CheckpointDamagedError``); those are only noise.

``install()`` replaces that one function with the same loop that, before
closing, waits for the tasks still pending (as ``asyncio.run`` does, but
letting them finish rather than cancelling them first, since TensorStore
reads are not cancellable) and retrieves their exceptions. Results and
errors of the main coroutine are unchanged.
"""

import asyncio
from collections.abc import Coroutine
from typing import Any

# Seconds to let the pending tasks finish before cancelling what is left.
_DRAIN_S = 60.0


def _drain(loop: asyncio.AbstractEventLoop) -> None:
  """Runs ``loop`` until its pending tasks are done; retrieves errors."""
  pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
  if not pending:
    return
  _, left = loop.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_S))
  for task in left:
    task.cancel()
  # return_exceptions marks every task's exception as retrieved.
  loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def run_sync_draining(coro: Coroutine[Any, Any, Any]) -> Any:
  """orbax's ``_run_sync_via_new_loop``, draining the loop before closing.

  Args:
    coro: the coroutine to run to completion on a new event loop.

  Returns:
    what ``coro`` returns (its exception propagates unchanged).
  """
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    try:
      _drain(loop)
    finally:
      asyncio.set_event_loop(None)
      loop.close()


def install() -> bool:
  """Makes orbax use ``run_sync_draining`` (idempotent).

  Returns:
    whether orbax has the function this replaces (False: another orbax
    version; nothing is changed).
  """
  try:
    from orbax.checkpoint._src import asyncio_utils
  except ImportError:
    return False
  if not hasattr(asyncio_utils, "_run_sync_via_new_loop"):
    return False
  asyncio_utils._run_sync_via_new_loop = run_sync_draining
  return True
