"""Orbax checkpoints of the train state and of the input pipeline's position.

A checkpoint step holds two items: `state` (the sharded train state, restored straight into
its shardings) and `dataset` (each process's input position, `data.BatchIterator.save`, so a
resumed run reads exactly the batches an uninterrupted run would have read). Orbax writes each
step to a temporary directory and renames it when complete, so a run killed mid-save resumes
from the previous step.
"""

import dataclasses
import os
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from lmindexer_jax import data


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and how many to keep.

  Attributes:
    period: save every `period` steps (and always at the last step and on SIGTERM).
    keep: how many of the newest checkpoints to keep; None keeps all.
  """

  period: int = 1000
  keep: int | None = 3


class DatasetIteratorHandler(ocp.CheckpointHandler):
  """Saves a `data.BatchIterator`'s position (each process writes its own)."""

  def save(self, directory: epath.Path, args: "DatasetIteratorSave"):
    args.iterator.save(str(directory))

  def restore(self, directory: epath.Path, args: "DatasetIteratorRestore"):
    args.iterator.restore(str(directory))
    return args.iterator


@ocp.args.register_with_handler(DatasetIteratorHandler, for_save=True)
@dataclasses.dataclass
class DatasetIteratorSave(ocp.args.CheckpointArgs):
  iterator: data.BatchIterator


@ocp.args.register_with_handler(DatasetIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DatasetIteratorRestore(ocp.args.CheckpointArgs):
  iterator: data.BatchIterator


class Checkpointer:
  """A `CheckpointManager` over `directory` with the items `state` and `dataset`."""

  def __init__(self, directory: str, config: CheckpointConfig):
    self._config = config
    self._manager = ocp.CheckpointManager(
        epath.Path(os.path.abspath(directory)),  # Orbax requires absolute paths.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            create=True,
            # The trainer decides when to save (period, last step, SIGTERM).
            save_interval_steps=1,
        ),
        item_names=("state", "dataset"),
    )

  @property
  def period(self) -> int:
    return self._config.period

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, iterator: data.BatchIterator | None = None) -> None:
    """Starts an asynchronous save of `state` (and the data iterator) at `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["dataset"] = DatasetIteratorSave(iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(
      self, step: int, abstract_state: Any, iterator: data.BatchIterator | None = None
  ) -> Any:
    """Restores `step` into the shapes and shardings of `abstract_state`.

    Args:
      step: the step to restore.
      abstract_state: a tree of `jax.ShapeDtypeStruct`s with `sharding` set.
      iterator: if given, its position is restored in place.

    Returns:
      The restored state.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["dataset"] = DatasetIteratorRestore(iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `state` placed on `shardings`, for `Checkpointer.restore`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
