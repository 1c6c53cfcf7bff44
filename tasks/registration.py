"""`register_corpus_tasks`: one call registers a dataset's whole seqio task family.

Tasks are named `lmindexer.<dataset>.<task>`:

  index               document -> inputs/targets = its tokens, doc_index, labels  (split train)
  indexing            document text -> its semantic ID (DSI memorisation)         (split train)
  retrieval           query -> semantic ID of a relevant document      (train/validation/test)
  retrieval_indexing  mixture of retrieval and indexing
  search              product query -> item ID                         (train/validation/test)
  rec                 history of item IDs, most recent first -> next item ID (leave-last-out)
  rec_titles          as rec, each history item written as `ID title`

Nothing is built at registration: the corpus, its vocabulary, the ID file and the ID vocabulary
are resolved when a dataset (or a vocabulary property) is first requested, so gin-configured
settings (`tasks.settings`) and an ID file written after import are honoured.

ID tasks share one vocabulary per (corpus, ID file): `SemanticIdVocabulary` over the corpus's
base vocabulary, sized from the ID file (`semantic_ids.read`: the `IdFile` config, else the
file's header, else max code + 1 per position).
"""

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import functools
import os

import numpy as np
import seqio
import tensorflow as tf

from lmindexer_jax import vocabularies
from tasks import corpus
from tasks import preprocessors
from tasks import semantic_ids
from tasks import settings

PREFIX = "lmindexer"
ALL_TASKS = ("index", "indexing", "retrieval", "search", "rec", "rec_titles")
TITLE_WORDS = 8  # default title: the first words of the text
# Splits of at most this many examples keep their tokenized examples in memory and are shuffled
# whole (`_InMemoryTask`).
MAX_EXAMPLES_IN_MEMORY = 100_000


class _InMemoryTask(seqio.Task):
  """A seqio Task whose deterministic preprocessing runs once per dataset, not once per epoch.

  Every task of the family looks up IDs and tokenizes one example at a time, ~0.4 ms per
  example on CPU (a batch of 32 costs about as much as the tiny model's whole training step),
  and a training run repeats the same work every epoch. Here the first `num_cached_steps`
  preprocessors (lookups and tokenization: no randomness, no sequence length) run before
  seqio's repeat and their output stays in memory when the split's size is known and at most
  `MAX_EXAMPLES_IN_MEMORY`; the rest run after it, as in any seqio Task. The examples and their
  order are those of the uncached pipeline. tf.data saves the kept examples with the input
  pipeline's checkpoint (~600 bytes each on the synthetic tasks), and the shuffle buffer below
  (as much again). This is not seqio's offline cache, which the sources do not permit: the
  examples depend on the ID file active when the dataset is built.

  A shuffled dataset is shuffled over the whole split (up to `MAX_EXAMPLES_IN_MEMORY`), not
  over seqio's default 1,000 examples: the sources list examples in order (a user's history
  prefixes one after another), and a 1,000-example window fills each batch with a few users'
  examples, in the same order every epoch.
  """

  def __init__(self, *args, num_cached_steps: int, **kwargs):
    super().__init__(*args, **kwargs)
    self._num_cached_steps = num_cached_steps

  def get_dataset(self, sequence_length: Mapping[str, int] | None = None,
                  split: str = "train", **kwargs) -> tf.data.Dataset:
    if kwargs.get("shuffle", True) and kwargs.get("shuffle_buffer_size") is None:
      count = int(self.source.get_dataset(split=split, shuffle=False).cardinality())
      kwargs["shuffle_buffer_size"] = max(self.shuffle_buffer_size,
                                          min(count, MAX_EXAMPLES_IN_MEMORY))
    return super().get_dataset(sequence_length, split, **kwargs)

  def preprocess_precache(self, dataset: tf.data.Dataset, seed: int | None = None
                          ) -> tf.data.Dataset:
    with seqio.utils.map_seed_manager(seed):
      dataset = self._preprocess_dataset(dataset, self.preprocessors[:self._num_cached_steps])
    count = int(dataset.cardinality())  # Negative when unknown or infinite.
    return dataset.cache() if 0 <= count <= MAX_EXAMPLES_IN_MEMORY else dataset

  def preprocess_postcache(self, dataset: tf.data.Dataset,
                           sequence_length: Mapping[str, int] | None, seed: int | None = None
                           ) -> tf.data.Dataset:
    with seqio.utils.map_seed_manager(seed):
      return self._preprocess_dataset(dataset, self.preprocessors[self._num_cached_steps:],
                                      sequence_length=sequence_length)


def task_name(dataset_name: str, task: str) -> str:
  return f"{PREFIX}.{dataset_name}.{task}"


_FAMILIES: dict[str, "_Family"] = {}  # dataset name -> its registered family


def corpus_source(dataset_name: str) -> corpus.CorpusSource:
  """The resolved corpus of a registered dataset (evaluation reads qrels and user sequences)."""
  if dataset_name not in _FAMILIES:
    raise KeyError(f"no registered dataset {dataset_name!r}; known: {sorted(_FAMILIES)}")
  return _FAMILIES[dataset_name].source()


@functools.lru_cache(maxsize=8)
def _validated(source: corpus.CorpusSource, name: str) -> corpus.CorpusSource:
  source.validate(name)
  return source


@functools.lru_cache(maxsize=8)
def _read_ids(
    source: corpus.CorpusSource, id_file: semantic_ids.IdFile, mtime_ns: int, size: int
) -> semantic_ids.SemanticIds:
  del mtime_ns, size  # Cache keys: a rewritten file is read again.
  return semantic_ids.load(id_file, source.doc_ids)


@functools.lru_cache(maxsize=8)
def _id_vocabulary(
    source: corpus.CorpusSource, codebook_sizes: tuple[int, ...], disambiguation_size: int
) -> vocabularies.SemanticIdVocabulary:
  return vocabularies.SemanticIdVocabulary(
      source.vocabulary, codebook_sizes, disambiguation_size
  )


@functools.lru_cache(maxsize=8)
def _doc_table(
    source: corpus.CorpusSource, ids: semantic_ids.SemanticIds
) -> preprocessors.DocTable:
  return preprocessors.DocTable(source.doc_ids, ids.id_strings())


class _Family:
  """The lazily resolved pieces of one dataset's tasks."""

  def __init__(self, name: str, provider: Callable[[], corpus.CorpusSource]):
    self.name = name
    self._provider = provider

  def source(self) -> corpus.CorpusSource:
    return _validated(self._provider(), self.name)

  def semantic_ids(self) -> semantic_ids.SemanticIds:
    id_file = settings.get(semantic_ids.IdFile)
    semantic_ids.check_configured(id_file)
    try:
      stat = os.stat(id_file.path)
    except OSError as e:
      raise semantic_ids.IdFileError(id_file.path, None, "file", e.strerror) from None
    return _read_ids(self.source(), id_file, stat.st_mtime_ns, stat.st_size)

  def base_vocabulary(self) -> seqio.Vocabulary:
    return self.source().vocabulary

  def id_vocabulary(self) -> vocabularies.SemanticIdVocabulary:
    ids = self.semantic_ids()
    return _id_vocabulary(self.source(), ids.codebook_sizes, ids.disambiguation_size)

  def doc_table(self) -> preprocessors.DocTable:
    return _doc_table(self.source(), self.semantic_ids())

  def doc_table_with_titles(self) -> preprocessors.DocTable:
    source = self.source()
    titles = source.titles
    if titles is None:
      if isinstance(source.texts, tf.data.Dataset):
        raise ValueError(f"{self.name}: rec_titles needs `titles` when texts are a tf.data.Dataset")
      titles = [" ".join(t.split()[:TITLE_WORDS]) for t in source.texts]
    return self.doc_table()._replace(titles=titles)

  def require(self, field: str):
    value = getattr(self.source(), field)
    if value is None:
      raise ValueError(f"{self.name}: the corpus has no {field}, needed by this task")
    return value

  # --- Data sources: raw fields per split. ---

  def documents(self, split: str, shuffle_files: bool, seed: int | None = None):
    del split, shuffle_files, seed  # One in-memory shard; seqio shuffles examples.
    source = self.source()
    n = len(source.doc_ids)
    texts = source.texts
    if isinstance(texts, tf.data.Dataset):
      count = int(texts.cardinality())
      if count >= 0 and count != n:  # Negative: unknown or infinite.
        raise ValueError(f"{self.name}: texts has {count} elements for {n} doc_ids")
    else:
      texts = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), tf.string))
    labels = source.labels if source.labels is not None else np.zeros((n, 0))
    fields = tf.data.Dataset.from_tensor_slices({
        "doc_id": tf.constant(list(source.doc_ids), tf.string),
        "doc_index": tf.range(n, dtype=tf.int32),
        "labels": tf.constant(np.asarray(labels, np.int32)),
    })
    return tf.data.Dataset.zip(fields, texts).map(lambda f, text: {**f, "text": text})

  def queries(self, field: str, split: str, shuffle_files: bool, seed: int | None = None):
    del shuffle_files, seed
    queries = self.require(field).get(split, ())
    if isinstance(queries, tf.data.Dataset):
      keys = set(queries.element_spec) if isinstance(queries.element_spec, dict) else set()
      if not {"query_id", "text", "doc_id"} <= keys:
        raise ValueError(
            f"{self.name}: {field}[{split!r}] must yield {{query_id, text, doc_id}}, got {keys}"
        )
      return queries
    rows = [(q.query_id, q.text, doc_id) for q in queries for doc_id in q.doc_ids]
    query_ids, texts, doc_ids = zip(*rows, strict=True) if rows else ((), (), ())
    return tf.data.Dataset.from_tensor_slices({
        "query_id": tf.constant(list(query_ids), tf.string),
        "text": tf.constant(list(texts), tf.string),
        "doc_id": tf.constant(list(doc_ids), tf.string),
    })

  def rec(self, split: str, shuffle_files: bool, seed: int | None = None):
    del shuffle_files, seed
    config = settings.get(corpus.RecConfig)
    examples = corpus.rec_examples(
        self.require("sequences"),
        split,
        user_ids=self.source().user_ids,
        train_windows=config.train_windows,
        max_history=config.max_history,
    )
    return tf.data.Dataset.from_tensor_slices({
        "user_id": tf.constant([e.user_id for e in examples], tf.string),
        "history": tf.ragged.constant(
            [list(e.history) for e in examples], tf.string, ragged_rank=1, inner_shape=()
        ),
        "doc_id": tf.constant([e.target for e in examples], tf.string),
    })


def _int_feature(rank: int) -> seqio.Feature:
  return seqio.Feature(seqio.PassThroughVocabulary(0), add_eos=False, dtype=tf.int32, rank=rank)


def register_corpus_tasks(
    dataset_name: str,
    corpus_provider: Callable[[], corpus.CorpusSource],
    *,
    tasks: Sequence[str] = ALL_TASKS,
    mixture_rates: tuple[float, float] = (1.0, 1.0),
) -> list[str]:
  """Registers `lmindexer.<dataset_name>.<task>` for each of `tasks` (and the mixture).

  Contract of `corpus_provider`: a zero-argument callable returning a `corpus.CorpusSource`.
  It is called whenever a dataset or vocabulary is requested, never at registration, so it
  should cache (return the same object for the same settings; the ID file and vocabulary caches
  key on that object) and may read its own settings via `tasks.settings.get(MyConfig)`.
  The source must carry what the listed tasks need: `queries` for retrieval, `search_queries`
  for search, `sequences` for rec/rec_titles (`titles`, else the first words of each text);
  a missing field fails when that task's dataset is requested, naming the dataset and field.
  Query and sequence doc ids must be doc ids of the corpus. ID tasks read the ID file of the
  active `semantic_ids.IdFile`, which must list every document of the corpus.

  Args:
    dataset_name: the `<dataset>` part of the names.
    corpus_provider: see above.
    tasks: which of ALL_TASKS to register; `retrieval_indexing` comes with retrieval+indexing.
    mixture_rates: sampling rates of (retrieval, indexing) in `retrieval_indexing`.

  Returns:
    The registered task and mixture names.
  """
  unknown = set(tasks) - set(ALL_TASKS)
  if unknown:
    raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {ALL_TASKS}")
  family = _Family(dataset_name, corpus_provider)
  _FAMILIES[dataset_name] = family
  base_vocab = vocabularies.LazyVocabulary(family.base_vocabulary, f"{dataset_name}.base")
  id_vocab = vocabularies.LazyVocabulary(family.id_vocabulary, f"{dataset_name}.semantic_ids")
  id_features = {
      "inputs": seqio.Feature(id_vocab, add_eos=True),
      "targets": seqio.Feature(id_vocab, add_eos=True),
  }
  add_ids = functools.partial(preprocessors.doc_id_to_targets, table_fn=family.doc_table)
  names = []

  def to_text(inputs_key: str, targets_key: str, *keep: str):
    return functools.partial(
        preprocessors.text_to_text, inputs_key=inputs_key, targets_key=targets_key, keep=keep
    )

  def add(task: str, dataset_fn, splits, steps, features):
    name = task_name(dataset_name, task)
    # Lookups and tokenization are deterministic and kept in memory (`_InMemoryTask`); EOS
    # placement depends on the sequence length, so it runs on every read.
    cached = [*steps, seqio.preprocessors.tokenize]
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=splits, caching_permitted=False),
        preprocessors=[*cached, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        task_cls=_InMemoryTask,
        num_cached_steps=len(cached),
    )
    names.append(name)

  if "index" in tasks:
    index_features = {
        "inputs": seqio.Feature(base_vocab, add_eos=True),
        "targets": seqio.Feature(base_vocab, add_eos=True),
        "doc_index": _int_feature(0),
        "labels": _int_feature(1),
    }
    steps = [to_text("text", "text", "doc_id", "doc_index", "labels")]
    add("index", family.documents, ("train",), steps, index_features)
  if "indexing" in tasks:
    steps = [add_ids, to_text("text", "targets", "doc_id")]
    add("indexing", family.documents, ("train",), steps, id_features)
  for task, field in (("retrieval", "queries"), ("search", "search_queries")):
    if task in tasks:
      steps = [add_ids, to_text("text", "targets", "query_id", "doc_id")]
      add(task, functools.partial(family.queries, field), corpus.SPLITS, steps, id_features)
  for task, with_titles in (("rec", False), ("rec_titles", True)):
    if task in tasks:
      history = functools.partial(
          preprocessors.history_to_inputs,
          table_fn=family.doc_table_with_titles if with_titles else family.doc_table,
          with_titles=with_titles,
      )
      # Windows and history length: `corpus.RecConfig`, read when the dataset is built.
      add(task, family.rec, corpus.SPLITS, [add_ids, history], id_features)
  if "retrieval" in tasks and "indexing" in tasks:
    name = task_name(dataset_name, "retrieval_indexing")
    seqio.MixtureRegistry.add(
        name,
        [
            (task_name(dataset_name, "retrieval"), mixture_rates[0]),
            (task_name(dataset_name, "indexing"), mixture_rates[1]),
        ],
    )
    names.append(name)
  return names
