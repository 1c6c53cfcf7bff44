"""What an indexer run records so that new documents can get IDs later (`assign.py`).

`MODEL_DIR/indexer_manifest.json` holds the T5 and indexer configs, the document length, the
index task, the base vocabulary's size and which stage's parameters assign each ID position;
`MODEL_DIR/base_vocabulary.model` is a copy of the base SentencePiece model. The copy matters:
a corpus's vocabulary is trained on its texts and cached by their content, so once the corpus
grows its task would train another vocabulary and tokenize new documents differently.
"""

from collections.abc import Sequence
import dataclasses
import json
import os
import typing
from typing import Any

import numpy as np
import seqio

from lmindexer_jax import files
from lmindexer_jax import indexer
from lmindexer_jax import t5
from lmindexer_jax import vocabularies

MANIFEST_FILE = "indexer_manifest.json"
VOCABULARY_FILE = "base_vocabulary.model"
_VERSION = 1


@dataclasses.dataclass(frozen=True)
class IndexerManifest:
  """An indexer run, as `read_indexer_manifest` returns it.

  Attributes:
    model_dir: the run's folder.
    index_task: the `lmindexer.<dataset>.index` task the run indexed.
    t5_config: the T5's sizes (its vocab_size: base + ID tokens, as the pipeline sets it).
    config: the indexer's method config (codebook sizes, quantizer_normalize, ...).
    max_length: document tokens (EOS included), for training and assignment alike.
    base_vocab_size: size of the base vocabulary (with its extra ids).
    extra_ids: the base vocabulary's seqio sentinels.
    position_stages: per ID position t, the stage (`MODEL_DIR/stages/<name>`) whose final
      parameters assigned c_t; the pipeline assigns position t right after `quantized_t`.
    final_stage: the last training stage.
    eval_batch_size: the batch the pipeline encoded the corpus with.
  """

  model_dir: str
  index_task: str
  t5_config: t5.T5Config
  config: indexer.IndexerConfig
  max_length: int
  base_vocab_size: int
  extra_ids: int
  position_stages: tuple[str, ...]
  final_stage: str
  eval_batch_size: int

  @property
  def layout(self) -> vocabularies.IdLayout:
    return vocabularies.IdLayout(self.base_vocab_size, self.config.codebook_sizes)

  @property
  def vocabulary_path(self) -> str:
    return os.path.join(self.model_dir, VOCABULARY_FILE)

  def vocabulary(self) -> seqio.SentencePieceVocabulary:
    """The run's base vocabulary, from its copy in the model dir."""
    return vocabularies.sentencepiece_vocabulary(self.vocabulary_path, extra_ids=self.extra_ids)

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.model_dir, "stages", name)


def _unwrap(vocabulary: seqio.Vocabulary) -> seqio.Vocabulary:
  while isinstance(vocabulary, vocabularies.LazyVocabulary):
    vocabulary = vocabulary.resolve()
  return vocabulary


def _jsonable(value: Any) -> Any:
  if dataclasses.is_dataclass(value):
    return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, bool | int | float | str) or value is None:
    return value
  try:  # Dtypes (T5Config.dtype): their name, which T5 accepts back.
    return np.dtype(value).name
  except TypeError:
    raise TypeError(f"cannot record {value!r} ({type(value).__name__}) in the manifest") from None


def _from_json(cls: type, values: dict[str, Any]) -> Any:
  """A dataclass from `_jsonable`'s dict: nested dataclasses rebuilt, lists back to tuples."""
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - fields
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
  kwargs = {}
  for name, value in values.items():
    hint = hints.get(name)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
      value = _from_json(hint, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)


def write_indexer_manifest(
    model_dir: str,
    *,
    index_task: str,
    t5_config: t5.T5Config,
    config: indexer.IndexerConfig,
    max_length: int,
    base_vocabulary: seqio.Vocabulary,
    eval_batch_size: int = 256,
    position_stages: Sequence[str] | None = None,
) -> str:
  """Records an indexer run for `assign` (atomically); returns the manifest's path.

  Args:
    model_dir: the run's folder (its `stages/` hold the checkpoints).
    index_task: the index task's name.
    t5_config: the T5 config the run trained.
    config: the run's `IndexerConfig`.
    max_length: document tokens.
    base_vocabulary: the index task's input vocabulary (a SentencePiece vocabulary, possibly
      behind a `LazyVocabulary`); its model file is copied into `model_dir`.
    eval_batch_size: the batch of `index_pipeline.encode_corpus`.
    position_stages: the stage assigning each position; default `quantized_<t>`.
  """
  vocabulary = _unwrap(base_vocabulary)
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    raise TypeError(f"the base vocabulary must be a SentencePiece vocabulary, got {vocabulary!r}")
  num_positions = len(config.codebook_sizes)
  stages = tuple(position_stages or (f"quantized_{t}" for t in range(num_positions)))
  if len(stages) != num_positions:
    raise ValueError(f"{len(stages)} position stages for {num_positions} positions: {stages}")
  with open(vocabulary.sentencepiece_model_file, "rb") as source:
    files.write_bytes(os.path.join(model_dir, VOCABULARY_FILE), source.read())
  manifest = {
      "version": _VERSION,
      "index_task": index_task,
      "t5_config": _jsonable(t5_config),
      "indexer_config": _jsonable(config),
      "max_length": int(max_length),
      "base_vocab_size": int(vocabulary.vocab_size),
      "extra_ids": int(vocabulary.extra_ids),
      "position_stages": list(stages),
      "final_stage": stages[-1],
      "eval_batch_size": int(eval_batch_size),
  }
  return files.write_json(os.path.join(model_dir, MANIFEST_FILE), manifest)


def read_indexer_manifest(model_dir: str) -> IndexerManifest:
  """The manifest of the run in `model_dir`; an error naming the file if it is absent or bad."""
  path = os.path.join(model_dir, MANIFEST_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{path}: no indexer manifest: {model_dir!r} is not a finished indexer run "
        "(index_pipeline.index writes it at the end)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  try:
    if raw.get("version") != _VERSION:
      raise ValueError(f"version {raw.get('version')!r}, expected {_VERSION}")
    manifest = IndexerManifest(
        model_dir=model_dir,
        index_task=str(raw["index_task"]),
        t5_config=_from_json(t5.T5Config, raw["t5_config"]),
        config=_from_json(indexer.IndexerConfig, raw["indexer_config"]),
        max_length=int(raw["max_length"]),
        base_vocab_size=int(raw["base_vocab_size"]),
        extra_ids=int(raw["extra_ids"]),
        position_stages=tuple(raw["position_stages"]),
        final_stage=str(raw["final_stage"]),
        eval_batch_size=int(raw["eval_batch_size"]),
    )
  except (KeyError, TypeError, ValueError) as e:
    detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
    raise ValueError(f"{path}: bad indexer manifest: {detail}") from None
  if not os.path.exists(manifest.vocabulary_path):
    raise FileNotFoundError(f"{manifest.vocabulary_path}: the run's base vocabulary is missing")
  return manifest
