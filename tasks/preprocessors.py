"""seqio preprocessors of the task family: raw fields -> `inputs`/`targets` strings.

ID strings come from a `DocTable` that the task builds when its dataset is requested (after the
ID file exists); lookups run in TF (a hash table from doc id to row), so they are deterministic
and a doc id unknown to the corpus fails the pipeline with that id in the message.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

REC_ITEM_SEPARATOR = ". "


class DocTable(NamedTuple):
  """Per document, in corpus order: its id, its ID string and (optionally) its title."""

  doc_ids: Sequence[str]
  id_strings: Sequence[str]
  titles: Sequence[str] | None = None


class _Lookup:
  """doc id -> ID string / title, in TF."""

  def __init__(self, table: DocTable):
    self._rows = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(table.doc_ids)), tf.range(len(table.doc_ids), dtype=tf.int64)
        ),
        default_value=-1,
    )
    self._ids = tf.constant(list(table.id_strings))
    self._titles = None if table.titles is None else tf.constant(list(table.titles))

  def rows(self, doc_ids: tf.Tensor) -> tf.Tensor:
    rows = self._rows.lookup(doc_ids)
    unknown = tf.boolean_mask(tf.reshape(doc_ids, [-1]), tf.reshape(rows < 0, [-1]))
    check = tf.debugging.Assert(tf.size(unknown) == 0, ["doc id not in the corpus:", unknown])
    with tf.control_dependencies([check]):
      return tf.identity(rows)

  def id_strings(self, doc_ids: tf.Tensor) -> tf.Tensor:
    return tf.gather(self._ids, self.rows(doc_ids))

  def titles(self, doc_ids: tf.Tensor) -> tf.Tensor:
    return tf.gather(self._titles, self.rows(doc_ids))


def text_to_text(
    dataset: tf.data.Dataset, inputs_key: str, targets_key: str, keep: Sequence[str] = ()
) -> tf.data.Dataset:
  """{inputs: ex[inputs_key], targets: ex[targets_key]} plus the `keep` fields."""
  return dataset.map(
      lambda ex: {
          "inputs": ex[inputs_key],
          "targets": ex[targets_key],
          **{k: ex[k] for k in keep},
      },
      num_parallel_calls=tf.data.AUTOTUNE,
  )


def doc_id_to_targets(
    dataset: tf.data.Dataset, table_fn: Callable[[], DocTable], doc_id_key: str = "doc_id"
) -> tf.data.Dataset:
  """Adds `targets`: the ID string of `ex[doc_id_key]` (e.g. `<id_0_3><id_1_5><id_2_0>`)."""
  lookup = _Lookup(table_fn())
  return dataset.map(
      lambda ex: {**ex, "targets": lookup.id_strings(ex[doc_id_key])},
      num_parallel_calls=tf.data.AUTOTUNE,
  )


def history_to_inputs(
    dataset: tf.data.Dataset,
    table_fn: Callable[[], DocTable],
    with_titles: bool = False,
    history_key: str = "history",
) -> tf.data.Dataset:
  """Adds `inputs`: the history's items (most recent first) as `ID[ title]` joined by ". "."""
  table = table_fn()
  if with_titles and table.titles is None:
    raise ValueError("rec inputs with titles need titles in the DocTable")
  lookup = _Lookup(table)

  def fn(ex):
    items = lookup.id_strings(ex[history_key])
    if with_titles:
      items = tf.strings.join([items, lookup.titles(ex[history_key])], separator=" ")
    return {**ex, "inputs": tf.strings.reduce_join(items, separator=REC_ITEM_SEPARATOR)}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
