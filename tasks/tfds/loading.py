"""Prepare a builder once and read its splits: for the seqio task layer and for scripts."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
import contextlib
import fcntl
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks.tfds import amazon2014
from tasks.tfds import beir
from tasks.tfds import common
from tasks.tfds import esci
from tasks.tfds import item_sequences
from tasks.tfds import msmarco
from tasks.tfds import nq320k

BUILDERS: dict[str, type[common.Builder]] = {
  cls.name: cls
  for cls in (
    amazon2014.Amazon2014,
    esci.Esci,
    nq320k.Nq320k,
    msmarco.MsMarcoPassage,
    beir.Beir,
    item_sequences.ItemSequences,
  )
}

BuilderRef = str | type[common.Builder]


def prepare(
  builder: BuilderRef,
  *,
  manual_dir: os.PathLike | str,
  data_dir: os.PathLike | str,
  config: str | common.Config | None = None,
) -> common.Builder:
  """Returns the builder with its data prepared under `data_dir` (no-op if already there).

  Args:
    builder: a builder class, or its name with an optional config (`'lmindexer_beir/brown'`).
    manual_dir: the folder with the raw files (nothing is ever downloaded).
    data_dir: where TFDS writes `<name>/<config>/<version>/`.
    config: a config name, or a config object such as
      `common.Config(name='strict', empty_documents='error')`; overrides one given in `builder`.
  """
  if isinstance(builder, str):
    name, _, name_config = builder.partition("/")
    if name not in BUILDERS:
      raise ValueError(f"unknown builder {name!r}; known: {sorted(BUILDERS)}")
    builder, config = BUILDERS[name], config or name_config or None
  # Processes preparing the same data at once (two jobs; the processes of a multi-process run
  # on one file system) would race to TFDS's final rename: one prepares while the others wait,
  # then they read its data. The builder is made under the lock: it reads what is on disk
  # when it is made.
  config_name = config.name if isinstance(config, common.Config) else config or "default"
  with _locked(os.path.join(os.fspath(data_dir), f".{builder.name}.{config_name}.lock")):
    b = builder(data_dir=os.fspath(data_dir), config=config)
    b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
  return b


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """An exclusive `flock` on `path` (created if needed) for the block; none on a remote file
  system (`gs://...`), which has no such locks."""
  if "://" in path:
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _own_fields(b: common.Builder, split: str) -> Callable[[dict], dict]:
  fields = b.split_fields(split)
  return lambda ex: {k: ex[k] for k in fields}


def load_splits(
  builder: BuilderRef,
  *,
  manual_dir: os.PathLike | str,
  data_dir: os.PathLike | str,
  config: str | common.Config | None = None,
  splits: Iterable[str] | None = None,
  as_lists: bool = False,
) -> dict[str, tf.data.Dataset | list[dict[str, Any]]]:
  """Prepares the builder and returns its splits, each with only its own fields.

  Splits come in source order (corpus in doc_index order). With `as_lists`, every split becomes
  a list of plain dicts (str, int, list of str), which suits small corpora.
  """
  b = prepare(builder, manual_dir=manual_dir, data_dir=data_dir, config=config)
  out = {}
  for split in splits or b.info.splits:
    ds = b.as_dataset(split=split, shuffle_files=False).map(_own_fields(b, split))
    out[split] = [_to_python(ex) for ex in tfds.as_numpy(ds)] if as_lists else ds
  return out


def dataset_fn(
  builder: BuilderRef,
  *,
  manual_dir: os.PathLike | str,
  data_dir: os.PathLike | str,
  config: str | common.Config | None = None,
) -> Callable[..., tf.data.Dataset]:
  """A `seqio.FunctionDataSource` dataset_fn, `fn(split, shuffle_files, seed=None)`.

  The builder is prepared on the first call.
  """

  def fn(split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
    b = prepare(builder, manual_dir=manual_dir, data_dir=data_dir, config=config)
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    ds = b.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
    return ds.map(_own_fields(b, split))

  return fn


def _to_python(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value
