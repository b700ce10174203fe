"""Training checkpoints in the workdir (orbax CheckpointManager): periodic, keep the last K,
resume from the latest, with a small JSON of run facts next to the state.

Teachers are not in here: they are loaded from their own converted directories at start-up, so
every checkpoint holds only what training changes (student, projectors, optimizer, step).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Saves asynchronously (device -> host copy happens before this returns)."""
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` into arrays with the shardings of ``abstract_state`` (ShapeDtypeStructs)."""
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
      ),
    )
    return out['state'], dict(out['extra'])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
