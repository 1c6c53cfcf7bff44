"""The schema and base class that every LMIndexer TFDS builder shares.

TFDS gives all splits of a dataset one feature dict. So each builder stores the union of the
fields of its split kinds, and every split fills only its own kind's fields. The other fields
hold '' / [] / -1. `tasks.tfds.load_splits` returns each split with only its own fields.

Split kinds and their fields:
  corpus      split `corpus`: `doc_id` str; `doc_index` int64 (0-based row in corpus order);
              `title` str ('' if none); `text` str (title and body: what a model reads);
              `labels` [str] (category path levels, top first; empty if unlabelled).
  queries     splits `train` / `validation` / `test`: `query_id` str; `query` str;
              `relevant_doc_ids` [str] (corpus doc ids).
  sequences   split `sequences`: `user_id` str; `item_ids` [str] (corpus doc ids, oldest first).

Recommendation builders call their item catalogue `corpus` too, with `doc_id` = item id. Then
one seqio task family can index any builder's `corpus` split.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import inspect
from typing import Any
from typing import ClassVar

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from tasks.tfds import readers

CORPUS = "corpus"
SEQUENCES = "sequences"
QUERIES = "queries"


def _text(doc: str) -> tfds.features.Text:
  return tfds.features.Text(doc=doc)


def _texts(doc: str) -> tfds.features.Sequence:
  return tfds.features.Sequence(tfds.features.Text(), doc=doc)


def corpus_features() -> dict[str, tfds.features.FeatureConnector]:
  return {
    "doc_id": _text("Document (or item) id as in the source files."),
    "doc_index": tfds.features.Scalar(np.int64, doc="0-based row in corpus order; -1 if n/a."),
    "title": _text("Title, '' if none."),
    "text": _text("Full document text: title and body."),
    "labels": _texts("Category path, top level first; empty if unlabelled."),
  }


def query_features() -> dict[str, tfds.features.FeatureConnector]:
  return {
    "query_id": _text("Query id as in the source (or `<split>-<row>` if it has none)."),
    "query": _text("Query text."),
    "relevant_doc_ids": _texts("Ids of the relevant corpus documents."),
  }


def sequence_features() -> dict[str, tfds.features.FeatureConnector]:
  return {
    "user_id": _text("User id as in the source."),
    "item_ids": _texts("The user's items (corpus doc ids), oldest first."),
  }


_DEFAULTS = {"doc_index": -1}


def fill(features: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
  """`values` plus the empty default of every other feature ('' / [] / -1)."""
  out = {}
  for name, feature in features.items():
    if name in values:
      out[name] = values[name]
    elif isinstance(feature, tfds.features.Sequence):
      out[name] = []
    else:
      out[name] = _DEFAULTS.get(name, "")
  unknown = set(values) - set(features)
  if unknown:
    raise KeyError(f"not in the schema: {sorted(unknown)}")
  return out


def split_kind(split: str) -> str:
  return split if split in (CORPUS, SEQUENCES) else QUERIES


@dataclasses.dataclass(eq=False)
class Config(tfds.core.BuilderConfig):
  """Builder config with the empty-document switch.

  Attributes:
    empty_documents: 'skip' (leave out and count in the log) or 'error' (raise DataError).
      This applies to documents and items whose text is empty or whitespace, and to such queries.
  """

  empty_documents: str = "skip"

  def __post_init__(self):
    readers.check_empty_policy(self.empty_documents)


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the LMIndexer builders: union schema, no shuffling, integer keys in source order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  # Split kinds stored: CORPUS plus QUERIES or SEQUENCES.
  KINDS: ClassVar[tuple[str, ...]] = (CORPUS, QUERIES)
  HOMEPAGE: ClassVar[str] = ""
  CITATION: ClassVar[str] = ""

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves this through `importlib_resources`, which the pinned set does not
    # install (etils >= 1.10 dropped it), so every builder outside TFDS fails to prepare. This is
    # TFDS's own fallback for a module that is a plain file.
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def kind_features(cls, kind: str) -> dict[str, tfds.features.FeatureConnector]:
    if kind == CORPUS:
      return corpus_features()
    if kind == SEQUENCES:
      return sequence_features()
    return cls.query_features()

  @classmethod
  def query_features(cls) -> dict[str, tfds.features.FeatureConnector]:
    """Query fields; a builder may add its own (ESCI's judgements)."""
    return query_features()

  @classmethod
  def feature_specs(cls) -> dict[str, tfds.features.FeatureConnector]:
    return {name: f for kind in cls.KINDS for name, f in cls.kind_features(kind).items()}

  @classmethod
  def split_fields(cls, split: str) -> tuple[str, ...]:
    """The fields that `split` fills."""
    return tuple(cls.kind_features(split_kind(split)))

  @property
  def empty_documents(self) -> str:
    return getattr(self.builder_config, "empty_documents", "skip")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(self.feature_specs()),
      homepage=self.HOMEPAGE or None,
      citation=self.CITATION or None,
      disable_shuffling=True,  # Keys are rows in source order, so splits read in that order.
    )

  def _generate_examples(self):
    raise NotImplementedError("_split_generators returns the example iterators themselves")

  def _corpus_examples(self, corpus: readers.Corpus) -> Iterator[tuple[int, dict[str, Any]]]:
    specs = self.info.features
    for doc_index, doc in corpus:
      yield (
        doc_index,
        fill(
          specs,
          {
            "doc_id": doc.doc_id,
            "doc_index": doc_index,
            "title": doc.title,
            "text": doc.text,
            "labels": list(doc.labels),
          },
        ),
      )

  def _add_query_split(
    self, splits: dict[str, Any], split: str, rows: list[dict[str, Any]], source: Any
  ) -> None:
    """Adds `split` unless it has no query (TFDS refuses empty splits), which is logged."""
    if rows:
      splits[split] = self._query_examples(rows)
    else:
      logging.warning("%s: no query with a relevant document: no %r split", source, split)

  def _query_examples(self, queries: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    specs = self.info.features
    for i, values in enumerate(queries):
      yield i, fill(specs, values)

  def _sequence_examples(
    self, sequences: list[tuple[str, list[str]]]
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    specs = self.info.features
    for i, (user, items) in enumerate(sequences):
      yield i, fill(specs, {"user_id": user, "item_ids": items})
