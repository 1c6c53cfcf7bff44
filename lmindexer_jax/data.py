"""The input pipeline: seqio task -> feature converter -> per-process batches.

Each process reads its own shard of the task (`seqio.ShardInfo` by process index) and batches
`batch_size / process_count` examples; `Partitioner.global_batch` assembles the global batch.
The pipeline is deterministic for a seed, and its position is checkpointed with the train
state: the trainer reads any `BatchIterator`, a seqio task's (`SeqioIterator`) or one of the
indexer's.
"""

import abc
from collections.abc import Mapping
import dataclasses
import importlib
import os

import jax
import numpy as np
import seqio
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read, as t5x's `utils.DatasetConfig`.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: e.g. {'inputs': 64, 'targets': 16}.
    batch_size: the GLOBAL batch size, over all processes.
    split: dataset split.
    shuffle: shuffle the examples (deterministically for `seed`).
    seed: seed of seqio's shuffles and preprocessors.
    pack: pack examples (seqio feature converter packing).
    use_cached: read a seqio offline cache.
    module: a module to import that registers the task (e.g. 'tasks').
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = "train"
  shuffle: bool = True
  seed: int | None = 0
  pack: bool = False
  use_cached: bool = False
  module: str | None = "tasks"


def get_dataset(
    cfg: DatasetConfig,
    feature_converter_cls: type[seqio.FeatureConverter] = seqio.EncDecFeatureConverter,
    num_epochs: int | None = None,
) -> tf.data.Dataset:
  """This process's batched dataset (repeated forever unless `num_epochs` is set)."""
  if cfg.module:
    importlib.import_module(cfg.module)
  n = jax.process_count()
  if cfg.batch_size % n:
    raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by process count ({n}).")
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name,
      task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=feature_converter_cls(pack=cfg.pack),
      dataset_split=cfg.split,
      use_cached=cfg.use_cached,
      shuffle=cfg.shuffle,
      num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=n),
      seed=cfg.seed,
  )
  return ds.batch(cfg.batch_size // n, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


class BatchIterator(abc.ABC):
  """Per-process numpy batches whose position can be saved and restored.

  `save`/`restore` write and read this process's position under a directory of the
  checkpoint (each process its own file), so a resumed run reads exactly the batches an
  uninterrupted run would have read.
  """

  @property
  @abc.abstractmethod
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one per-process batch."""

  @abc.abstractmethod
  def __next__(self) -> dict[str, np.ndarray]: ...

  def __iter__(self):
    return self

  @abc.abstractmethod
  def save(self, directory: str) -> None: ...

  @abc.abstractmethod
  def restore(self, directory: str) -> None: ...


class SeqioIterator(BatchIterator):
  """Batches of a seqio task or mixture; the tf.data iterator is checkpointed by TensorFlow."""

  def __init__(
      self,
      cfg: DatasetConfig,
      feature_converter_cls: type[seqio.FeatureConverter] = seqio.EncDecFeatureConverter,
      num_epochs: int | None = None,
  ):
    dataset = get_dataset(cfg, feature_converter_cls, num_epochs)
    self._spec = {
        k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype.as_numpy_dtype)
        for k, v in dataset.element_spec.items()
    }
    self._iterator = iter(dataset)

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    return self._spec

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  def _prefix(self, directory: str) -> str:
    return os.path.join(directory, f"process_{jax.process_index()}", "iterator")

  def save(self, directory: str) -> None:
    tf.train.Checkpoint(iterator=self._iterator).write(self._prefix(directory))

  def restore(self, directory: str) -> None:
    tf.train.Checkpoint(iterator=self._iterator).read(self._prefix(directory)).assert_consumed()
