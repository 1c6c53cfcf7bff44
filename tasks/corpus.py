"""The corpus contract: what a dataset hands `register_corpus_tasks`, and the rec split.

A `CorpusSource` holds plain Python sequences (and optionally `tf.data` datasets for the large
text collections). Documents are identified by string doc ids; a document's row in `doc_ids`
is its `doc_index`, the corpus order that the indexer and the ID file follow.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
from typing import NamedTuple

from absl import logging
import numpy as np
import seqio
import tensorflow as tf

from tasks import settings

SPLITS = ("train", "validation", "test")


@settings.config_class
@dataclasses.dataclass(frozen=True)
class RecConfig:
  """How user sequences become rec examples (`rec_examples`), for every dataset's rec tasks.

  Attributes:
    train_windows: training targets per user before the validation item (the reference: 5;
      a large value trains on every prefix, as RecBole's sequential models do).
    max_history: most recent history items kept in an input.
  """

  train_windows: int = 5
  max_history: int = 20

  def __post_init__(self):
    if self.train_windows < 1 or self.max_history < 1:
      raise ValueError(f"train_windows and max_history must be positive: {self}")


class Query(NamedTuple):
  """A query and the ids of its relevant documents."""

  query_id: str
  text: str
  doc_ids: tuple[str, ...]


# A split's queries: Python `Query`s, or a tf.data.Dataset of
# {'query_id': string, 'text': string, 'doc_id': string}, one element per (query, relevant doc).
QuerySplits = Mapping[str, Sequence[Query] | tf.data.Dataset]


@dataclasses.dataclass(frozen=True, eq=False)
class CorpusSource:
  """Everything the task family of one dataset is built from.

  Only `doc_ids`, `texts` and `vocabulary` are required; each task checks for the fields it
  needs when its dataset is requested.

  Attributes:
    doc_ids: unique document ids, in corpus order.
    texts: document texts in corpus order, as strings or a tf.data.Dataset of scalar strings.
    vocabulary: the base (text) vocabulary, e.g. `vocabularies.sentencepiece_vocabulary(path)`.
    titles: short item titles (rec inputs with titles); default: the first 8 words of a text.
    labels: int [N, num_levels] category labels per document (-1 = unknown), for evaluation.
    queries: retrieval queries by split ('train', 'validation', 'test').
    search_queries: product-search queries by split.
    sequences: per user, the doc ids of the interacted items in time order (rec).
    user_ids: one id per sequence; default: the row number as a string.
  """

  doc_ids: Sequence[str]
  texts: Sequence[str] | tf.data.Dataset
  vocabulary: seqio.Vocabulary
  titles: Sequence[str] | None = None
  labels: np.ndarray | None = None
  queries: QuerySplits | None = None
  search_queries: QuerySplits | None = None
  sequences: Sequence[Sequence[str]] | None = None
  user_ids: Sequence[str] | None = None

  @functools.cached_property
  def doc_index(self) -> dict[str, int]:
    """doc id -> row in corpus order."""
    return {doc_id: i for i, doc_id in enumerate(self.doc_ids)}

  def validate(self, name: str) -> None:
    """Checks what can be checked in Python; errors name the dataset and the field."""
    n = len(self.doc_ids)
    if len(self.doc_index) != n:
      seen, dup = set(), None
      for doc_id in self.doc_ids:
        if doc_id in seen:
          dup = doc_id
          break
        seen.add(doc_id)
      raise ValueError(f"{name}: doc_ids are not unique (e.g. {dup!r})")
    for field in ("texts", "titles"):
      value = getattr(self, field)
      if value is not None and not isinstance(value, tf.data.Dataset) and len(value) != n:
        raise ValueError(f"{name}: {field} has {len(value)} entries for {n} doc_ids")
    if self.labels is not None and (self.labels.ndim != 2 or len(self.labels) != n):
      raise ValueError(f"{name}: labels must be [{n}, num_levels], got {self.labels.shape}")
    for field in ("queries", "search_queries"):
      for split, queries in (getattr(self, field) or {}).items():
        if split not in SPLITS:
          raise ValueError(f"{name}: {field} has unknown split {split!r} (expected {SPLITS})")
        if isinstance(queries, tf.data.Dataset):
          continue  # Checked when read (unknown doc ids fail the lookup).
        for q in queries:
          for doc_id in q.doc_ids:
            if doc_id not in self.doc_index:
              raise ValueError(
                  f"{name}: {field}[{split!r}] query {q.query_id!r} names unknown doc {doc_id!r}"
              )
    if self.sequences is not None:
      if self.user_ids is not None and len(self.user_ids) != len(self.sequences):
        raise ValueError(
            f"{name}: {len(self.user_ids)} user_ids for {len(self.sequences)} sequences"
        )
      for u, seq in enumerate(self.sequences):
        for doc_id in seq:
          if doc_id not in self.doc_index:
            raise ValueError(f"{name}: sequences[{u}] names unknown doc {doc_id!r}")


class RecExample(NamedTuple):
  user_id: str
  history: tuple[str, ...]  # doc ids, most recent first
  target: str


def target_positions(num_items: int, split: str,
                     train_windows: int = RecConfig.train_windows) -> range:
  """Indices of a user's items that `split` predicts (leave-last-out; see `rec_examples`)."""
  if split == "test":
    return range(num_items - 1, num_items)
  if split == "validation":
    return range(num_items - 2, num_items - 1)
  return range(max(1, num_items - 2 - train_windows), num_items - 2)


def rec_examples(
    sequences: Sequence[Sequence[str]],
    split: str,
    *,
    user_ids: Sequence[str] | None = None,
    train_windows: int = RecConfig.train_windows,
    max_history: int = RecConfig.max_history,
) -> list[RecExample]:
  """Leave-last-out examples of one split, deterministic.

  For a user's items i_0 .. i_{n-1}: test predicts i_{n-1} from i_0..i_{n-2}; validation
  predicts i_{n-2} from i_0..i_{n-3}; train predicts each of the last `train_windows` items
  before i_{n-2} (i_j with j >= 1) from i_0..i_{j-1}. The reference (sqrec_gen.py) instead draws
  5 random windows whose targets are among the 3 items before i_{n-2}, with random starts; here
  every window is a full prefix, so the split is deterministic. Histories keep the `max_history`
  most recent items, most recent first. Users with fewer than 3 items are skipped (logged).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
  out, skipped = [], 0
  for u, items in enumerate(sequences):
    user = user_ids[u] if user_ids is not None else str(u)
    if len(items) < 3:
      skipped += 1
      continue
    for j in target_positions(len(items), split, train_windows):
      history = tuple(items[max(0, j - max_history) : j][::-1])
      out.append(RecExample(user, history, items[j]))
  if skipped:
    logging.warning("rec %s: skipped %d users with fewer than 3 items.", split, skipped)
  return out
