"""Task families of the real datasets: the TFDS builders of `tasks.tfds` as `CorpusSource`s.

One frozen config class per dataset holds its settings (gin: `tasks.real.BrownConfig.vocab_size
= 8000`; the entry point hands them to `tasks.settings`). On first use a dataset's builder is
prepared (`tasks.tfds.load_splits`) from its manual dir into a data dir, read into Python, and
turned into a `CorpusSource` with a SentencePiece vocabulary (given, or trained on the corpus and
cached); both are cached per config. Registration touches no file.

| dataset | builder (config) | tasks |
| --- | --- | --- |
| brown, womens_clothing_reviews | lmindexer_beir (same name) | index, indexing |
| ml100k | lmindexer_item_sequences (ml100k) | index, indexing, rec, rec_titles |
| beir | lmindexer_beir (default) | index, indexing, retrieval (+ mixture) |
| item_sequences | lmindexer_item_sequences (default) | index, indexing, rec, rec_titles |
| amazon2014_{beauty,sports,toys} | lmindexer_amazon2014 | index, indexing, rec, rec_titles |
| esci | lmindexer_esci (us) | index, indexing, search |
| nq320k | lmindexer_nq320k | index, indexing, retrieval (+ mixture) |
| msmarco | lmindexer_msmarco_passage | index, indexing, retrieval (+ mixture) |

Labels: a document's category path (`informative/press/reportage`) becomes one int per level,
the id of the path's prefix at that level among all prefixes of that level (`RealCorpus.
label_names` maps them back). A path shorter than the deepest one repeats its leaf, so the last
level is every document's full path; unlabelled documents are -1 at every level.

The corpus is held in memory (doc ids, texts, queries); for MS MARCO's 8.8M passages set
`max_docs` (the first documents in corpus order) or expect several GB.
"""

from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Any
from typing import ClassVar

from absl import logging
import numpy as np
import tensorflow as tf

from lmindexer_jax import vocabularies
from tasks import corpus
from tasks import registration
from tasks import settings

# `<repo>/../shared/data`: the real sets of this checkout (brown, womens_clothing_reviews, ml100k).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
_READ_BATCH = 4096
_INDEXING = ("index", "indexing")
_REC = (*_INDEXING, "rec", "rec_titles")
_RETRIEVAL = (*_INDEXING, "retrieval")


@dataclasses.dataclass(frozen=True)
class RealDataConfig:
  """Settings of one real dataset; each dataset has its own subclass (gin binds by class).

  Attributes:
    manual_dir: the folder with the raw files; "" = `../shared/data/<name>` for the sets there.
    data_dir: where TFDS prepares the data; "" = `vocabularies.cache_dir()/tfds/<name>-<hash>`,
      one folder per manual dir and its files (a given data_dir is reused as it is).
    builder_config: the TFDS builder config (e.g. ESCI's locale 'us').
    empty_documents: 'skip' (leave out, logged) or 'error' for empty documents and queries.
    max_docs: keep the first `max_docs` documents in corpus order (queries and histories drop
      the others); None = all.
    vocabulary_path: a SentencePiece `.model` (or a folder with `spiece.model`, e.g. a Hugging
      Face T5 folder); "" = train one on the corpus texts, cached by their content.
    vocab_size: pieces of the trained vocabulary (without extra ids).
    vocab_train_docs: train the vocabulary on the first documents only; None = all.
    seed: SentencePiece's seed.
    category_in_text: append each document's category path to its text (`Toy Story (1995);
      category: Animation|Children's|Comedy`), as the paper's item text for recommendation
      has the category (the Amazon builder writes it so already). AMI against those labels
      then measures what the models were given to read.
  """

  # Per dataset (not gin-configurable): see `_dataset` below.
  name: ClassVar[str] = ""
  builder: ClassVar[str] = ""
  tasks: ClassVar[tuple[str, ...]] = _INDEXING
  query_field: ClassVar[str] = "queries"  # The CorpusSource field of the builder's query splits.
  shared_folder: ClassVar[str] = ""  # Folder under SHARED_DATA used when manual_dir is "".

  manual_dir: str = ""
  data_dir: str = ""
  builder_config: str = "default"
  empty_documents: str = "skip"
  max_docs: int | None = None
  vocabulary_path: str = ""
  vocab_size: int = 8000
  vocab_train_docs: int | None = None
  seed: int = 0
  category_in_text: bool = False

  def __post_init__(self):
    if self.empty_documents not in ("skip", "error"):
      raise ValueError(f"empty_documents must be 'skip' or 'error', got {self.empty_documents!r}")
    for field in ("max_docs", "vocab_train_docs"):
      value = getattr(self, field)
      if value is not None and value < 1:
        raise ValueError(f"{field} must be None or positive, got {value}")
    if self.vocab_size < 1:
      raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")

  @classmethod
  def binding(cls, field: str) -> str:
    """The gin binding of a field, for error messages: `tasks.real.BrownConfig.manual_dir`."""
    return f"{cls.__module__}.{cls.__qualname__}.{field}"


def _dataset(name: str, builder: str, tasks: tuple[str, ...], **class_vars):
  """Class decorator: the dataset's ClassVars, and listed in `tasks.settings`."""

  def wrap(cls):
    cls.name, cls.builder, cls.tasks = name, builder, tasks
    for key, value in class_vars.items():
      setattr(cls, key, value)
    return settings.config_class(cls)

  return wrap


@_dataset("brown", "lmindexer_beir", _INDEXING, shared_folder="brown")
@dataclasses.dataclass(frozen=True)
class BrownConfig(RealDataConfig):
  """Brown Corpus passages (4,690) with genre paths of 2-3 levels; corpus only."""

  builder_config: str = "brown"


@_dataset(
    "womens_clothing_reviews", "lmindexer_beir", _INDEXING, shared_folder="womens_clothing_reviews"
)
@dataclasses.dataclass(frozen=True)
class WomensClothingReviewsConfig(RealDataConfig):
  """Women's clothing reviews (22,641) with department/class paths; corpus only."""

  builder_config: str = "womens_clothing_reviews"


@_dataset("ml100k", "lmindexer_item_sequences", _REC, shared_folder="ml100k")
@dataclasses.dataclass(frozen=True)
class Ml100kConfig(RealDataConfig):
  """MovieLens-100K: 1,682 movies (genre set as one label) and 943 user histories."""

  builder_config: str = "ml100k"
  vocab_size: int = 2000


@_dataset("beir", "lmindexer_beir", _RETRIEVAL)
@dataclasses.dataclass(frozen=True)
class BeirConfig(RealDataConfig):
  """Any BEIR-like folder: corpus.jsonl, queries.jsonl, qrels/*.tsv, labels.tsv."""


@_dataset("item_sequences", "lmindexer_item_sequences", _REC)
@dataclasses.dataclass(frozen=True)
class ItemSequencesConfig(RealDataConfig):
  """Any item-sequence folder: items.jsonl and sequences.jsonl."""


@_dataset("amazon2014_beauty", "lmindexer_amazon2014", _REC)
@dataclasses.dataclass(frozen=True)
class AmazonBeautyConfig(RealDataConfig):
  """Amazon 2014 Beauty, 5-core (12,101 items in the reference)."""

  builder_config: str = "beauty"


@_dataset("amazon2014_sports", "lmindexer_amazon2014", _REC)
@dataclasses.dataclass(frozen=True)
class AmazonSportsConfig(RealDataConfig):
  """Amazon 2014 Sports and Outdoors, 5-core (18,357 items in the reference)."""

  builder_config: str = "sports_and_outdoors"


@_dataset("amazon2014_toys", "lmindexer_amazon2014", _REC)
@dataclasses.dataclass(frozen=True)
class AmazonToysConfig(RealDataConfig):
  """Amazon 2014 Toys and Games, 5-core (11,924 items in the reference)."""

  builder_config: str = "toys_and_games"


@_dataset("esci", "lmindexer_esci", (*_INDEXING, "search"), query_field="search_queries")
@dataclasses.dataclass(frozen=True)
class EsciConfig(RealDataConfig):
  """Shopping Queries (ESCI): products and queries (train, test); relevant = exact (E)."""

  builder_config: str = "us"
  vocab_size: int = 32000


@_dataset("nq320k", "lmindexer_nq320k", _RETRIEVAL)
@dataclasses.dataclass(frozen=True)
class Nq320kConfig(RealDataConfig):
  """NQ320k in the DSI/NCI layout: 109,739 Wikipedia documents, NQ train and dev queries."""

  vocab_size: int = 32000


@_dataset("msmarco", "lmindexer_msmarco_passage", _RETRIEVAL)
@dataclasses.dataclass(frozen=True)
class MsMarcoConfig(RealDataConfig):
  """MS MARCO passage ranking (8.8M passages; set max_docs or expect several GB)."""

  vocab_size: int = 32000
  vocab_train_docs: int | None = 200_000


CONFIGS: dict[str, type[RealDataConfig]] = {
    cls.name: cls
    for cls in (
        BrownConfig,
        WomensClothingReviewsConfig,
        Ml100kConfig,
        BeirConfig,
        ItemSequencesConfig,
        AmazonBeautyConfig,
        AmazonSportsConfig,
        AmazonToysConfig,
        EsciConfig,
        Nq320kConfig,
        MsMarcoConfig,
    )
}


@dataclasses.dataclass(frozen=True, eq=False)
class RealCorpus:
  """One dataset as read from its prepared TFDS splits; rows follow corpus order.

  Attributes:
    titles: the builder's titles ('' where the source has none).
    texts: what a model reads (title and body, as the builder writes it; plus the category
      path with `category_in_text`).
    label_paths: the category path of each document, top level first (() if unlabelled).
    labels: int32 [N, num_levels] prefix ids (see the module docstring); None if unlabelled.
    label_names: [level][id] -> the prefix path at that level, '/'-joined.
    queries: the query splits (train/validation/test), if the builder has them.
    sequences: per user, the doc ids of their items, oldest first (recommendation builders).
  """

  config: RealDataConfig
  doc_ids: tuple[str, ...]
  titles: tuple[str, ...]
  texts: tuple[str, ...]
  label_paths: tuple[tuple[str, ...], ...]
  labels: np.ndarray | None
  label_names: tuple[tuple[str, ...], ...]
  queries: dict[str, tuple[corpus.Query, ...]] | None = None
  sequences: tuple[tuple[str, ...], ...] | None = None
  user_ids: tuple[str, ...] | None = None

  @property
  def num_label_levels(self) -> int:
    return len(self.label_names)


def encode_labels(
    paths: Sequence[Sequence[str]],
) -> tuple[np.ndarray, tuple[tuple[str, ...], ...]]:
  """Category paths -> (int32 [N, depth] prefix ids, [level][id] -> prefix name).

  Ids are ranks of the sorted prefix names at each level; a shorter path repeats its leaf;
  an empty path is -1 at every level.
  """
  depth = max(map(len, paths), default=0)
  labels = np.full((len(paths), depth), -1, np.int32)
  names = []
  for level in range(depth):
    prefixes = ["/".join(path[: level + 1]) if path else None for path in paths]
    level_names = tuple(sorted({p for p in prefixes if p is not None}))
    index = {name: i for i, name in enumerate(level_names)}
    labels[:, level] = [-1 if p is None else index[p] for p in prefixes]
    names.append(level_names)
  return labels, tuple(names)


def resolve_manual_dir(config: RealDataConfig) -> str:
  """The manual dir of `config`; an error naming the gin binding if there is none."""
  cls = type(config)
  if config.manual_dir:
    path = os.path.expanduser(config.manual_dir)
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"{cls.name}: manual_dir {path!r} is not a folder (set {cls.binding('manual_dir')})"
      )
    return path
  if cls.shared_folder and (SHARED_DATA / cls.shared_folder).is_dir():
    return str(SHARED_DATA / cls.shared_folder)
  absent = f" ({SHARED_DATA / cls.shared_folder} is absent)" if cls.shared_folder else ""
  raise ValueError(
      f"{cls.name}: no data folder{absent}: set {cls.binding('manual_dir')} (MANUAL_DIR in "
      f"gin/data/{cls.name}.gin) to the folder with the raw files of {cls.builder}"
  )


def resolve_data_dir(config: RealDataConfig, manual_dir: str) -> str:
  """`config.data_dir`, else a cache folder keyed on the manual dir and its files."""
  if config.data_dir:
    return os.path.expanduser(config.data_dir)
  # Keyed on the files too: TFDS reuses prepared data, so a changed folder needs a new one.
  root = os.path.abspath(manual_dir)
  files = []
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      files.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
  digest = hashlib.sha256(repr((root, sorted(files))).encode()).hexdigest()[:12]
  return os.path.join(vocabularies.cache_dir(), "tfds", f"{type(config).name}-{digest}")


def _builder_config(config: RealDataConfig):
  """The TFDS builder config, renamed when strict so it never reuses a 'skip' preparation."""
  from tasks import tfds as tfds_builders  # Lazy: `import tasks` stays free of the builders.

  builder = tfds_builders.BUILDERS[type(config).builder]
  named = builder.builder_configs.get(config.builder_config)
  if named is None:
    raise ValueError(
        f"{type(config).binding('builder_config')}: {config.builder_config!r} is not a config of "
        f"{builder.name} ({sorted(builder.builder_configs)})"
    )
  if config.empty_documents == named.empty_documents:
    return named
  return dataclasses.replace(
      named, name=f"{named.name}_{config.empty_documents}", empty_documents=config.empty_documents
  )


def _decode(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, list):
    return [_decode(v) for v in value]
  return value


def _read(ds: tf.data.Dataset) -> dict[str, list]:
  """A split's columns as Python lists (strings decoded), read in batches."""
  columns: dict[str, list] = {key: [] for key in ds.element_spec}
  for batch in ds.ragged_batch(_READ_BATCH):
    for key, value in batch.items():
      rows = value.to_list() if isinstance(value, tf.RaggedTensor) else value.numpy().tolist()
      columns[key].extend(_decode(rows))
  return columns


def _queries(rows: dict[str, list], kept: set[str], name: str, split: str):
  queries, dropped = [], 0
  for query_id, text, relevant in zip(
      rows["query_id"], rows["query"], rows["relevant_doc_ids"], strict=True
  ):
    relevant = tuple(d for d in relevant if d in kept)
    if relevant:
      queries.append(corpus.Query(query_id, text, relevant))
    else:
      dropped += 1
  if dropped:
    logging.info("%s %s: %d queries without a relevant document left out", name, split, dropped)
  return tuple(queries)


@functools.lru_cache(maxsize=4)
def load(config: RealDataConfig) -> RealCorpus:
  """Prepares the dataset of `config` (once per data dir) and reads it (cached per config)."""
  from tasks import tfds as tfds_builders

  cls = type(config)
  manual_dir = resolve_manual_dir(config)
  data_dir = resolve_data_dir(config, manual_dir)
  logging.info("%s: reading %s from %s (data_dir %s)", cls.name, cls.builder, manual_dir, data_dir)
  splits = tfds_builders.load_splits(
      cls.builder, manual_dir=manual_dir, data_dir=data_dir, config=_builder_config(config)
  )
  docs = _read(splits.pop("corpus"))
  n = len(docs["doc_id"]) if config.max_docs is None else config.max_docs
  doc_ids = tuple(docs["doc_id"][:n])
  label_paths = tuple(tuple(path) for path in docs["labels"][:n])
  labels, label_names = encode_labels(label_paths)
  texts = tuple(docs["text"][:n])
  if config.category_in_text:
    texts = tuple(
        f"{text}; category: {'/'.join(path)}" if path else text
        for text, path in zip(texts, label_paths, strict=True)
    )
  kept = set(doc_ids)

  sequences = user_ids = None
  if "sequences" in splits:
    rows = _read(splits.pop("sequences"))
    user_ids = tuple(rows["user_id"])
    sequences = tuple(tuple(i for i in items if i in kept) for items in rows["item_ids"])
  queries = {
      split: _queries(_read(ds), kept, cls.name, split) for split, ds in splits.items()
  } or None
  return RealCorpus(
      config=config,
      doc_ids=doc_ids,
      titles=tuple(docs["title"][:n]),
      texts=texts,
      label_paths=label_paths,
      labels=labels if label_names else None,
      label_names=label_names,
      queries=queries,
      sequences=sequences,
      user_ids=user_ids,
  )


def vocabulary(config: RealDataConfig):
  """The base vocabulary: `vocabulary_path`, else SentencePiece trained on the texts (cached)."""
  if config.vocabulary_path:
    path = os.path.expanduser(config.vocabulary_path)
    if os.path.isdir(path):
      path = os.path.join(path, "spiece.model")
    return vocabularies.sentencepiece_vocabulary(path)
  texts = load(config).texts[: config.vocab_train_docs]
  digest = hashlib.sha256()
  for text in texts:
    digest.update(text.encode("utf-8"))
    digest.update(b"\0")
  return vocabularies.cached_sentencepiece_vocabulary(
      f"tfds-corpus-{len(texts)}-{digest.hexdigest()}",
      lambda: texts,
      config.vocab_size,
      seed=config.seed,
  )


@functools.lru_cache(maxsize=4)
def corpus_source(config: RealDataConfig) -> corpus.CorpusSource:
  """The `CorpusSource` of `config` (cached per config)."""
  c = load(config)
  search = type(config).query_field == "search_queries"
  # Untitled items (Brown, MovieLens) show the first words of their text in rec_titles.
  words = registration.TITLE_WORDS
  titles = tuple(t or " ".join(x.split()[:words]) for t, x in zip(c.titles, c.texts, strict=True))
  return corpus.CorpusSource(
      doc_ids=c.doc_ids,
      texts=c.texts,
      vocabulary=vocabulary(config),
      titles=titles,
      labels=c.labels,
      queries=None if search else c.queries,
      search_queries=c.queries if search else None,
      sequences=c.sequences,
      user_ids=c.user_ids,
  )


def active_corpus(name: str) -> RealCorpus:
  """The corpus of dataset `name` under its active config (e.g. for its `label_names`)."""
  return load(settings.get(CONFIGS[name]))


def _provider(cls: type[RealDataConfig]):
  return lambda: corpus_source(settings.get(cls))


TASKS: dict[str, list[str]] = {
    name: registration.register_corpus_tasks(name, _provider(cls), tasks=cls.tasks)
    for name, cls in CONFIGS.items()
}
"""Registered task and mixture names per dataset (`lmindexer.<dataset>.<task>`)."""
