"""The seqio task family: every synthetic task feeds EncDecFeatureConverter; splits are right."""

import collections
import itertools
import pathlib

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from lmindexer_jax import gin_utils
import tasks
from tasks import corpus
from tasks import registration
from tasks import semantic_ids
from tasks import settings
from tasks import synthetic

TINY = synthetic.CorpusConfig(
    num_docs=96, branching=(4, 2, 2), words_per_topic=(8, 6, 4), num_users=24, vocab_size=300
)
LENGTHS = {"inputs": 48, "targets": 8}
GIN_DIR = pathlib.Path(__file__).parent.parent / "gin"
ID_TASKS = ("indexing", "retrieval", "search", "rec", "rec_titles", "retrieval_indexing")


def _name(task: str) -> str:
  return f"lmindexer.synthetic.{task}"


@pytest.fixture(scope="module")
def id_file(tmp_path_factory):
  """The planted labels as IDs (child index per level) plus a collision counter."""
  c = synthetic.build(TINY)
  codes, size = semantic_ids.append_disambiguation(c.planted_codes)
  path = str(tmp_path_factory.mktemp("ids") / semantic_ids.FILE_NAME)
  semantic_ids.write(path, c.doc_ids, codes, codebook_sizes=TINY.branching,
                     disambiguation_size=size)
  return path


@pytest.fixture(autouse=True)
def tiny_settings(id_file):
  with settings.configured(TINY, semantic_ids.IdFile(path=id_file)):
    yield


def _examples(name: str, split: str = "train") -> list[dict]:
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


def test_registered_names():
  expected = {_name(t) for t in ("index", *ID_TASKS)}
  assert set(tasks.SYNTHETIC_TASKS) == expected
  for name in expected:
    assert seqio.get_mixture_or_task(name) is not None


@pytest.mark.parametrize("task", ("index", *ID_TASKS))
def test_every_task_yields_encdec_batches(task):
  split = "validation" if task in ("retrieval", "search", "rec") else "train"
  ds = seqio.get_dataset(
      _name(task), LENGTHS, seqio.EncDecFeatureConverter(pack=False),
      dataset_split=split, shuffle=False,
  )
  batch = next(iter(ds.batch(4)))
  assert batch["encoder_input_tokens"].shape == (4, LENGTHS["inputs"])
  assert batch["decoder_target_tokens"].shape == (4, LENGTHS["targets"])
  targets = batch["decoder_target_tokens"].numpy()
  if task != "index":
    # The ID's 4 tokens (3 planted levels + counter), then EOS.
    vocab = seqio.get_mixture_or_task(_name(task)).output_features["targets"].vocabulary
    layout = vocab.resolve().layout
    for row in targets:
      assert [layout.code_of(t)[0] for t in row[:4]] == [0, 1, 2, 3]
      assert row[4] == vocab.eos_id


@pytest.mark.parametrize("task", ("rec", "retrieval_indexing"))
def test_examples_kept_in_memory_are_those_of_the_uncached_pipeline(task, monkeypatch):
  def three_epochs():
    ds = seqio.get_dataset(
        _name(task), LENGTHS, seqio.EncDecFeatureConverter(pack=False), dataset_split="train",
        shuffle=True, seed=3, num_epochs=3)
    return [{k: v.tolist() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]

  cached = three_epochs()
  monkeypatch.setattr(registration, "MAX_EXAMPLES_IN_MEMORY", 0)
  assert three_epochs() == cached


def test_training_order_mixes_the_whole_split(monkeypatch):
  """The rec source lists each user's examples together; a shuffled split draws from all of it.

  seqio's buffer (1,000 by default, 4 here) would keep the first examples among the first users.
  """
  task = seqio.get_mixture_or_task(_name("rec"))
  monkeypatch.setattr(task, "_shuffle_buffer_size", 4)
  users = [e["user_id"] for e in _examples(_name("rec"))]
  assert len(set(users[:16])) <= 4  # source order: a user's examples one after another
  ds = task.get_dataset(None, split="train", shuffle=True, seed=0, num_epochs=1)
  first = [users.index(e["user_id"]) for e in itertools.islice(ds.as_numpy_iterator(), 12)]
  assert max(first) > len(users) // 2
  assert len({users[i] for i in first}) >= 8
  epoch = [e["user_id"] for e in ds.as_numpy_iterator()]
  assert collections.Counter(epoch) == collections.Counter(users)
  # An explicit buffer is kept.
  ds = task.get_dataset(None, split="train", shuffle=True, seed=0, shuffle_buffer_size=4)
  assert max(users.index(e["user_id"]) for e in itertools.islice(ds.as_numpy_iterator(), 12)) < 16


def test_cached_steps_run_once_per_example():
  seen = []

  def noted(dataset):
    def note(text):
      seen.append(text.numpy())
      return text

    return dataset.map(
        lambda ex: {"text": tf.ensure_shape(tf.py_function(note, [ex["text"]], tf.string), [])})

  source = seqio.FunctionDataSource(
      lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({"text": ["a", "b", "c"]}),
      splits=("train",))
  task = registration._InMemoryTask("cached_steps_test", source=source, preprocessors=[noted],
                                    output_features={}, num_cached_steps=1)
  ds = task.get_dataset(None, split="train", shuffle=False, num_epochs=3)
  assert [ex["text"] for ex in ds.as_numpy_iterator()] == [b"a", b"b", b"c"] * 3
  assert seen == [b"a", b"b", b"c"]


def test_id_vocabulary_is_sized_from_the_id_file(id_file):
  vocab = seqio.get_mixture_or_task(_name("retrieval")).output_features["targets"].vocabulary
  ids = semantic_ids.read(id_file)
  base = synthetic.vocabulary(TINY)
  assert ids.codebook_sizes == TINY.branching
  assert vocab.vocab_size == base.vocab_size + sum(TINY.branching) + ids.disambiguation_size


def test_index_task_keeps_corpus_order_and_labels():
  c = synthetic.build(TINY)
  examples = _examples(_name("index"))
  assert [e["doc_index"] for e in examples] == list(range(TINY.num_docs))
  np.testing.assert_array_equal(np.stack([e["labels"] for e in examples]), c.labels)
  assert examples[5]["inputs_pretokenized"].decode() == c.texts[5]
  assert examples[5]["inputs"][-1] == 1  # EOS


def test_targets_are_ids_of_the_relevant_documents(id_file):
  ids = semantic_ids.read(id_file)
  id_of = dict(zip(ids.doc_ids, ids.id_strings(), strict=True))
  c = synthetic.build(TINY)
  text_of = {q.query_id: q.text for q in c.queries["test"]}
  examples = _examples(_name("retrieval"), "test")
  assert len(examples) == len(c.queries["test"])
  for e in examples:
    assert e["targets_pretokenized"].decode() == id_of[e["doc_id"].decode()]
    assert e["inputs_pretokenized"].decode() == text_of[e["query_id"].decode()]
  e = _examples(_name("indexing"))[7]
  assert e["targets_pretokenized"].decode() == id_of[c.doc_ids[7]]


def test_splits():
  c = synthetic.build(TINY)
  query_ids = {s: {e["query_id"] for e in _examples(_name("retrieval"), s)} for s in corpus.SPLITS}
  assert not set.intersection(*query_ids.values())
  assert sum(map(len, query_ids.values())) == sum(len(c.queries[s]) for s in corpus.SPLITS)
  # Documents are indexed in train only; the mixture's validation is retrieval alone.
  for task in ("index", "indexing"):
    assert seqio.get_mixture_or_task(_name(task)).splits == ("train",)
  mixture = seqio.get_mixture_or_task(_name("retrieval_indexing"))
  assert {t.name for t in mixture.tasks} == {_name("retrieval"), _name("indexing")}
  ds = mixture.get_dataset(None, split="validation", shuffle=False, num_epochs=1)
  assert sum(1 for _ in ds) == len(c.queries["validation"])


def test_rec_is_leave_last_out(id_file):
  c = synthetic.build(TINY)
  history_of = {f"u{u}": [c.doc_ids[i] for i in h] for u, h in enumerate(c.histories)}
  by_split = {s: _examples(_name("rec"), s) for s in corpus.SPLITS}
  for split, offset in (("test", 1), ("validation", 2)):
    assert len(by_split[split]) == TINY.num_users
    for e in by_split[split]:
      items = history_of[e["user_id"].decode()]
      assert e["doc_id"].decode() == items[-offset]
      assert [d.decode() for d in e["history"]] == items[:-offset][::-1][:20]  # max_history
  per_user = collections.Counter()
  for e in by_split["train"]:
    items = history_of[e["user_id"].decode()]
    held_out = set(items[-2:])
    assert e["doc_id"].decode() not in held_out
    assert not {d.decode() for d in e["history"]} & held_out
    per_user[e["user_id"].decode()] += 1
  # One example per item before the validation item (not the first), at most 5 per user.
  assert per_user == {u: min(5, len(h) - 3) for u, h in history_of.items()}
  # Inputs: the history's IDs, most recent first.
  ids = semantic_ids.read(id_file)
  id_of = dict(zip(ids.doc_ids, ids.id_strings(), strict=True))
  e = by_split["test"][0]
  assert e["inputs_pretokenized"].decode() == ". ".join(id_of[d.decode()] for d in e["history"])
  titled = _examples(_name("rec_titles"), "test")[0]
  first = e["history"][0].decode()
  assert titled["inputs_pretokenized"].decode().startswith(
      f"{id_of[first]} {c.titles[c.doc_ids.index(first)]}. "
  )


def test_rec_config_sets_windows_and_history():
  """`corpus.RecConfig` (gin: tasks.corpus.RecConfig.*) reaches the rec tasks' datasets."""
  c = synthetic.build(TINY)
  with settings.configured(corpus.RecConfig(train_windows=1000, max_history=3)):
    train = _examples(_name("rec"), "train")
    test = _examples(_name("rec"), "test")
  # Every prefix before the validation item: n - 3 targets per user (the first has no history).
  assert len(train) == sum(len(h) - 3 for h in c.histories)
  assert max(len(e["history"]) for e in test) == 3
  with pytest.raises(ValueError, match="positive"):
    corpus.RecConfig(train_windows=0)
  # ml100k.gin binds it, so a binding on the command line reaches the tasks.
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(GIN_DIR / "data" / "ml100k.gin")],
                                        ["tasks.corpus.RecConfig.train_windows = 7"])
    with settings.configured():
      gin_utils.configure_task_settings()
      assert settings.get(corpus.RecConfig) == corpus.RecConfig(train_windows=7)
  finally:
    gin.clear_config()


def test_rec_examples_windows():
  items = list("abcdefgh")
  train = corpus.rec_examples([items], "train", train_windows=3, max_history=2)
  assert [(e.history, e.target) for e in train] == [
      (("c", "b"), "d"), (("d", "c"), "e"), (("e", "d"), "f")
  ]
  (val,) = corpus.rec_examples([items], "validation", max_history=2)
  assert val == corpus.RecExample("0", ("f", "e"), "g")
  (test,) = corpus.rec_examples([items], "test", user_ids=["ann"])
  assert test == corpus.RecExample("ann", tuple("gfedcba"), "h")
  assert corpus.rec_examples([["a", "b"]], "test") == []  # Too short: skipped, logged.


def test_gin_binding_changes_the_corpus():
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / "data" / "synthetic.gin")],
        ["tasks.synthetic.CorpusConfig.num_docs = 40",
         "tasks.synthetic.CorpusConfig.branching = (2, 2, 2)",
         "tasks.synthetic.CorpusConfig.vocab_size = 200"],
    )

    with settings.configured():
      gin_utils.configure_task_settings()  # What the entry point does after parsing.
      assert settings.get(synthetic.CorpusConfig).num_docs == 40
      assert settings.get(semantic_ids.IdFile).path == ""
      assert len(synthetic.corpus_source().doc_ids) == 40
      assert len(_examples(_name("index"))) == 40
      with pytest.raises(ValueError, match="IdFile.path"):
        _examples(_name("retrieval"))
  finally:
    gin.clear_config()
  assert len(synthetic.corpus_source().doc_ids) == TINY.num_docs


def test_register_corpus_tasks_from_tf_data(tmp_path):
  doc_ids = ["a", "b", "c"]
  texts = tf.data.Dataset.from_tensor_slices(["ka lo mi", "ne su ta", "ri po ve"])
  queries = {
      "train": [corpus.Query("q0", "ka", ("a", "c"))],
      "test": tf.data.Dataset.from_tensor_slices(
          {"query_id": ["q1"], "text": ["su"], "doc_id": ["zz"]}
      ),
  }
  vocab = synthetic.vocabulary(TINY)
  source = corpus.CorpusSource(doc_ids, texts, vocab, queries=queries)
  names = tasks.register_corpus_tasks("unittest", lambda: source, tasks=("index", "retrieval"))
  assert names == ["lmindexer.unittest.index", "lmindexer.unittest.retrieval"]
  index = _examples("lmindexer.unittest.index")
  assert [e["doc_id"] for e in index] == [b"a", b"b", b"c"]
  assert index[1]["labels"].shape == (0,)

  path = semantic_ids.write(str(tmp_path / "u.tsv"), doc_ids, np.array([[0, 1], [1, 0], [1, 1]]))
  with settings.configured(semantic_ids.IdFile(path=path)):
    train = _examples("lmindexer.unittest.retrieval")
    assert [e["targets_pretokenized"] for e in train] == [b"<id_0_0><id_1_1>", b"<id_0_1><id_1_1>"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="zz"):
      _examples("lmindexer.unittest.retrieval", "test")
  with pytest.raises(ValueError, match="unknown tasks"):
    tasks.register_corpus_tasks("unittest2", lambda: source, tasks=("nope",))
