"""Training checkpoints in the workdir (orbax CheckpointManager): periodic, keep the last K,
resume from the latest, with a small JSON of run facts next to the state.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash
or a kill -9 during a save (or a full disk) leaves the previous checkpoints intact and the
half-written one invisible to ``latest_step``.

Teachers are not in here: they are loaded from their own converted directories at start-up, so
every checkpoint holds only what training changes (student, projectors, optimizer, step).
"""

from __future__ import annotations

import sys
from typing import Any

import orbax.checkpoint as ocp

from moma_jax import storage


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, no permission); earlier ones are intact."""


class Checkpointer:
  def __init__(self, directory: storage.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = storage.resolve(directory)  # local or gs://: never os.path.abspath a URI
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
      ),
    )
    self._submitted: int | None = None
    _drop_closed_loop_callbacks()  # before any save: the tracebacks come before orbax's error

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def finalized_steps(self) -> list[int]:
    """Steps whose checkpoint is complete on storage (renamed from its temporary directory)."""
    root = self.directory
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []

  def save(self, step: int, state: Any, extra: dict[str, Any]) -> None:
    """Saves asynchronously (device -> host copy happens before this returns). A failure of this
    save or of the previous asynchronous one raises CheckpointWriteError."""
    done = self.finalized_steps()
    previous = done[-1] if done else None
    # An asynchronous save that failed surfaces at the next save: name the step that failed.
    failing = self._submitted if self._submitted not in (None, previous) else step
    self._submitted = step
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
        force=True,
      )
    except Exception as e:  # noqa: BLE001 -- tensorstore / orbax raise ValueError, OSError, ...
      raise self._write_error(failing, previous, e) from None

  def _write_error(self, step: int, previous: int | None, e: Exception) -> CheckpointWriteError:
    """The one-line error of a failed save, after removing the save's half-written temporary
    directory (orbax leaves it behind; a resume ignores it, but it holds the space that ran out)."""
    try:
      for p in self.directory.iterdir():
        if '.orbax-checkpoint-tmp' in p.name:
          p.rmtree()
    except Exception:  # noqa: BLE001  (best effort: the error below is what matters)
      pass
    first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    kept = (
      f'the checkpoint of step {previous} is intact'
      if previous is not None
      else 'no earlier checkpoint'
    )
    return CheckpointWriteError(
      f'could not write the checkpoint of step {step} in {self.directory} (disk full or not '
      f'writable?): {first}; {kept}: free space and rerun the same command to resume'
    )

  def read_extra(self, step: int) -> dict[str, Any]:
    """The JSON facts of a checkpoint, without touching its arrays (cheap)."""
    out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(out['extra'])

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got a preemption notice (multi-process runs; uses JAX's
    preemption sync point, so all hosts agree on the step)."""
    return self._manager.reached_preemption(step)

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
    done = self.finalized_steps()
    previous = done[-1] if done else None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(self._submitted, previous, e) from None

  def close(self) -> None:
    self._manager.close()


def _drop_closed_loop_callbacks() -> None:
  """After a failed save, tensorstore's threads finish the save's other writes and hand each result
  to the asyncio loop that orbax has already closed: each hand-over raises 'Event loop is closed',
  which tensorstore reports as unraisable (PyErr_WriteUnraisable, hence sys.unraisablehook): 200
  tracebacks for one full disk, which once split the run's one-line error. They say nothing that
  error does not, so this hook drops exactly those and passes everything else on."""
  previous = sys.unraisablehook
  if getattr(previous, '_drops_closed_loop', False):
    return

  def hook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed':
      return
    previous(unraisable)

  hook._drops_closed_loop = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook
