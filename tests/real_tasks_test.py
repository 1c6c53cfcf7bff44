"""The real datasets' task families (`tasks.real`): counts, labels, splits, batches and gin.

The shared sets (`../shared/data`) are checked against their SOURCE.md counts and skipped when
absent; a generic BEIR folder is written by the test. TFDS prepares into one tmp data_dir per
module, and the vocabularies are small and trained on a few documents, to keep this fast.
"""

import collections
import dataclasses
import json
import pathlib

import gin
import numpy as np
import pytest
import seqio

from lmindexer_jax import gin_utils
from lmindexer_jax import vocabularies
from tasks import real
from tasks import semantic_ids
from tasks import settings

LENGTHS = {"inputs": 32, "targets": 8}
GIN_DIR = pathlib.Path(__file__).parent.parent / "gin" / "data"
SMALL_VOCAB = {"vocab_size": 300, "vocab_train_docs": 200}


def _shared(folder: str) -> str:
  path = real.SHARED_DATA / folder
  if not (path / "SOURCE.md").exists():
    pytest.skip(f"{path} is absent")
  return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


def _batches(name: str, split: str = "train", lengths=None) -> list[dict]:
  ds = seqio.get_dataset(
      name, lengths or LENGTHS, seqio.EncDecFeatureConverter(pack=False),
      dataset_split=split, shuffle=False,
  )
  return [{k: v.numpy() for k, v in b.items()} for b in ds.batch(4).take(2)]


def _check_batches(name: str, split: str = "train", lengths=None) -> None:
  lengths = lengths or LENGTHS
  batches = _batches(name, split, lengths)
  assert len(batches) == 2
  for batch in batches:
    assert batch["encoder_input_tokens"].shape == (4, lengths["inputs"])
    assert batch["decoder_target_tokens"].shape == (4, lengths["targets"])
    assert (batch["encoder_input_tokens"][:, 0] > 1).all()  # Real tokens, not PAD/EOS.


def _examples(name: str, split: str = "train") -> list[dict]:
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


def _write_ids(path: pathlib.Path, doc_ids, sizes=(8, 8)) -> str:
  """Distinct IDs in corpus order: the row number in mixed radix."""
  n = np.arange(len(doc_ids))
  codes = np.stack([n // sizes[1] % sizes[0], n % sizes[1], n // (sizes[0] * sizes[1])], axis=1)
  extra = int(codes[:, 2].max()) + 1
  return semantic_ids.write(str(path), doc_ids, codes, codebook_sizes=sizes,
                            disambiguation_size=extra)


# --- Without data: registration, labels, paths, gin files. ---


def test_registered_names():
  assert real.TASKS["brown"] == ["lmindexer.brown.index", "lmindexer.brown.indexing"]
  assert real.TASKS["ml100k"] == [
      "lmindexer.ml100k.index", "lmindexer.ml100k.indexing",
      "lmindexer.ml100k.rec", "lmindexer.ml100k.rec_titles",
  ]
  for name in ("beir", "nq320k", "msmarco"):
    assert f"lmindexer.{name}.retrieval_indexing" in real.TASKS[name]
  assert "lmindexer.esci.search" in real.TASKS["esci"]
  for name in ("beauty", "sports", "toys"):
    assert f"lmindexer.amazon2014_{name}.rec_titles" in real.TASKS[f"amazon2014_{name}"]
  assert "lmindexer.womens_clothing_reviews.index" in real.TASKS["womens_clothing_reviews"]
  assert "lmindexer.item_sequences.rec" in real.TASKS["item_sequences"]
  for names in real.TASKS.values():
    for name in names:
      assert seqio.get_mixture_or_task(name) is not None


def test_encode_labels():
  paths = [("a", "x", "1"), ("a", "y"), (), ("b", "x")]
  labels, names = real.encode_labels(paths)
  assert names == (("a", "b"), ("a/x", "a/y", "b/x"), ("a/x/1", "a/y", "b/x"))
  np.testing.assert_array_equal(labels, [[0, 0, 0], [0, 1, 1], [-1, -1, -1], [1, 2, 2]])
  assert real.encode_labels([(), ()])[0].shape == (2, 0)


def test_missing_data_names_the_binding(tmp_path, monkeypatch):
  monkeypatch.setattr(real, "SHARED_DATA", tmp_path / "absent")
  config = real.BrownConfig(data_dir=str(tmp_path), seed=12345)  # Not cached by other tests.
  with settings.configured(config):
    with pytest.raises(ValueError, match=r"tasks\.real\.BrownConfig\.manual_dir"):
      _examples("lmindexer.brown.index")
  with pytest.raises(ValueError, match=r"tasks\.real\.BeirConfig\.manual_dir"):
    _examples("lmindexer.beir.index")  # No default folder.
  missing = real.BeirConfig(manual_dir=str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="BeirConfig.manual_dir"):
    real.load(missing)
  with pytest.raises(ValueError, match="not a config"):
    real.load(real.EsciConfig(manual_dir=str(tmp_path), builder_config="xx"))
  with pytest.raises(ValueError, match="empty_documents"):
    real.BrownConfig(empty_documents="drop")


def test_default_data_dir_is_keyed_on_the_folder(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  (tmp_path / "a" / "corpus.jsonl").write_text("x\n")
  config = real.BeirConfig()
  dir_a = real.resolve_data_dir(config, str(tmp_path / "a"))
  assert dir_a.startswith(str(pathlib.Path(vocabularies.cache_dir()) / "tfds" / "beir-"))
  assert dir_a == real.resolve_data_dir(config, str(tmp_path / "a"))
  assert dir_a != real.resolve_data_dir(config, str(tmp_path / "b"))
  (tmp_path / "a" / "corpus.jsonl").write_text("changed\n")
  assert dir_a != real.resolve_data_dir(config, str(tmp_path / "a"))
  assert real.resolve_data_dir(real.BeirConfig(data_dir="/d"), str(tmp_path / "a")) == "/d"


_AMAZON = (real.AmazonBeautyConfig, real.AmazonSportsConfig, real.AmazonToysConfig)
_GIN_FILES = [(n, (c,)) for n, c in real.CONFIGS.items() if c not in _AMAZON]


@pytest.mark.parametrize("name, classes", [*_GIN_FILES, ("amazon2014", _AMAZON)])
def test_gin_files_bind_their_config(name, classes):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / f"{name}.gin")], ["MANUAL_DIR = '/data/x'", "ID_FILE = '/ids.tsv'"]
    )
    with settings.configured():
      gin_utils.configure_task_settings()
      for cls in classes:
        assert settings.get(cls).manual_dir == "/data/x"
      assert settings.get(semantic_ids.IdFile).path == "/ids.tsv"
      assert gin.query_parameter("INDEX_TASK/macro.value") in real.TASKS[classes[0].name]
  finally:
    gin.clear_config()


def test_gin_requires_manual_dir_for_generic_folders():
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="MANUAL_DIR"):
      gin.parse_config_files_and_bindings([str(GIN_DIR / "beir.gin")], [])
  finally:
    gin.clear_config()


# --- A BEIR folder written here: retrieval with an ID file, labels, max_docs. ---

_TOPICS = {"sports/ball": "goal kick pitch", "sports": "race run track", "food/fruit": "apple pear"}


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("beir")
  topics = list(_TOPICS)
  with open(root / "corpus.jsonl", "w") as f:
    for i in range(12):
      words = _TOPICS[topics[i % 3]]
      f.write(json.dumps({"_id": f"d{i}", "title": f"item {i}", "text": f"{words} number {i}"}))
      f.write("\n")
  with open(root / "queries.jsonl", "w") as f:
    for q in range(9):
      f.write(json.dumps({"_id": f"q{q}", "text": f"find {q}"}) + "\n")
  (root / "qrels").mkdir()
  # Query q -> docs d{q} and d{q + 3}; q6..q8 point at the last docs only.
  for stem, queries in (("train", range(0, 4)), ("dev", range(4, 6)), ("test", range(6, 9))):
    rows = ["query-id\tcorpus-id\tscore"]
    for q in queries:
      rows += [f"q{q}\td{q}\t1", f"q{q}\td{q + 3}\t1"] if q < 6 else [f"q{q}\td{q + 3}\t1"]
    (root / "qrels" / f"{stem}.tsv").write_text("\n".join(rows) + "\n")
  labels = ["doc_id\tcategory"] + [f"d{i}\t{topics[i % 3]}" for i in range(10)]  # d10, d11: none
  (root / "labels.tsv").write_text("\n".join(labels) + "\n")
  return root


def test_beir_folder_retrieval(beir_dir, data_dir, tmp_path):
  config = real.BeirConfig(manual_dir=str(beir_dir), data_dir=data_dir, vocab_size=100)
  c = real.load(config)
  assert c.doc_ids == tuple(f"d{i}" for i in range(12))
  assert c.texts[0] == "item 0. goal kick pitch number 0"
  assert c.label_names == (("food", "sports"), ("food/fruit", "sports", "sports/ball"))
  np.testing.assert_array_equal(c.labels[:3], [[1, 2], [1, 1], [0, 0]])  # "sports" repeats.
  np.testing.assert_array_equal(c.labels[10:], -1)
  assert {s: len(q) for s, q in c.queries.items()} == {"train": 4, "validation": 2, "test": 3}
  assert c.queries["train"][1].doc_ids == ("d1", "d4")

  id_path = _write_ids(tmp_path / "ids.tsv", c.doc_ids, sizes=(2, 3))
  ids = semantic_ids.read(id_path)
  id_of = dict(zip(ids.doc_ids, ids.id_strings(), strict=True))
  with settings.configured(config, semantic_ids.IdFile(path=id_path)):
    _check_batches("lmindexer.beir.retrieval")
    examples = _examples("lmindexer.beir.retrieval", "test")
    assert [e["query_id"] for e in examples] == [b"q6", b"q7", b"q8"]
    for e in examples:
      assert e["targets_pretokenized"].decode() == id_of[e["doc_id"].decode()]
    mixture = seqio.get_mixture_or_task("lmindexer.beir.retrieval_indexing")
    validation = mixture.get_dataset(None, split="validation", shuffle=False, num_epochs=1)
    assert sum(1 for _ in validation) == 4  # Retrieval rows only: documents are train-only.
    index = _examples("lmindexer.beir.index")
    np.testing.assert_array_equal(np.stack([e["labels"] for e in index]), c.labels)

  # The first 8 docs: q5 keeps d5 only, q6..q8 (d9..d11) have no document left.
  small = real.load(dataclasses.replace(config, max_docs=8))
  assert len(small.doc_ids) == 8 and small.labels.shape == (8, 2)
  assert small.queries["validation"][1].doc_ids == ("d5",)
  assert small.queries["test"] == ()
  # 'error' prepares apart from the default 'skip', and this folder has no empty document.
  strict = real.load(dataclasses.replace(config, empty_documents="error"))
  assert strict.doc_ids == c.doc_ids
  assert (pathlib.Path(data_dir) / "lmindexer_beir" / "default_error").is_dir()


# --- The shared sets, with the counts of their SOURCE.md. ---


@pytest.fixture(scope="module")
def brown(data_dir):
  _shared("brown")
  return real.BrownConfig(data_dir=data_dir, **SMALL_VOCAB)  # manual_dir "": the shared one.


def test_brown(brown):
  c = real.load(brown)
  assert len(c.doc_ids) == 4690 and len(set(c.doc_ids)) == 4690
  assert c.labels.shape == (4690, 3) and (c.labels >= 0).all()
  assert c.label_names[0] == ("imaginative", "informative")
  assert len(c.label_names[2]) == 15  # Leaf genres.
  top = collections.Counter(c.label_names[0][i] for i in c.labels[:, 0])
  assert top == {"informative": 3431, "imaginative": 1259}
  learned = c.label_names[2].index("informative/learned")
  assert (c.labels[:, 2] == learned).sum() == 701
  assert c.queries is None and c.sequences is None
  with settings.configured(brown):
    _check_batches("lmindexer.brown.index")
    first = _examples("lmindexer.brown.index")[0]
    assert first["doc_id"].decode() == c.doc_ids[0]
    np.testing.assert_array_equal(first["labels"], c.labels[0])


def test_womens_clothing_reviews(data_dir):
  folder = _shared("womens_clothing_reviews")
  config = real.WomensClothingReviewsConfig(manual_dir=folder, data_dir=data_dir, **SMALL_VOCAB)
  c = real.load(config)
  assert len(c.doc_ids) == 22641
  assert c.labels.shape == (22641, 2)
  assert (c.labels[:, 0] < 0).sum() == 13  # Reviews without department/class.
  assert len(c.label_names[0]) == 6 and len(c.label_names[1]) == 20
  assert sum(bool(t) for t in c.titles) == 19675
  with settings.configured(config):
    _check_batches("lmindexer.womens_clothing_reviews.index")


@pytest.fixture(scope="module")
def ml100k(data_dir):
  return real.Ml100kConfig(manual_dir=_shared("ml100k"), data_dir=data_dir, **SMALL_VOCAB)


def test_ml100k_index(ml100k):
  c = real.load(ml100k)
  assert len(c.doc_ids) == 1682 and len(c.user_ids) == 943
  assert sum(map(len, c.sequences)) == 100_000
  assert c.texts[0] == "Toy Story (1995)"
  assert c.label_names[0][c.labels[0, 0]] == "Animation|Children's|Comedy"
  with settings.configured(ml100k):
    _check_batches("lmindexer.ml100k.index")


def test_ml100k_category_in_text(ml100k):
  plain = real.load(ml100k)
  config = dataclasses.replace(ml100k, category_in_text=True)
  c = real.load(config)
  assert c.texts[0] == "Toy Story (1995); category: Animation|Children's|Comedy"
  assert c.doc_ids == plain.doc_ids and (c.labels == plain.labels).all()
  with settings.configured(config):
    (first,) = _examples("lmindexer.ml100k.index")[:1]
  assert first["inputs_pretokenized"].decode() == c.texts[0]
  # The vocabulary is trained on what the model reads.
  assert real.vocabulary(config) != real.vocabulary(ml100k)


def test_ml100k_rec_is_leave_last_out(ml100k, tmp_path):
  c = real.load(ml100k)
  with open(pathlib.Path(ml100k.manual_dir) / "sequences.jsonl") as f:
    raw = {row["user_id"]: row["items"] for row in map(json.loads, f)}
  id_path = _write_ids(tmp_path / "ids.tsv", c.doc_ids)
  with settings.configured(ml100k, semantic_ids.IdFile(path=id_path)):
    _check_batches("lmindexer.ml100k.rec", "test", {"inputs": 64, "targets": 8})
    for split, offset in (("test", 1), ("validation", 2)):
      examples = _examples("lmindexer.ml100k.rec", split)
      assert len(examples) == 943
      for e in examples:
        items = raw[e["user_id"].decode()]
        assert e["doc_id"].decode() == items[-offset]
        assert [d.decode() for d in e["history"]] == items[:-offset][::-1][:20]
    titled = _examples("lmindexer.ml100k.rec_titles", "test")[0]
    last = c.doc_ids.index(titled["history"][0].decode())
    assert real.corpus_source(ml100k).titles[last] in titled["inputs_pretokenized"].decode()


def test_gin_brown_makes_the_config_active(brown):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / "brown.gin")],
        [f"tasks.real.BrownConfig.data_dir = '{brown.data_dir}'",
         "tasks.real.BrownConfig.vocab_size = 300",
         "tasks.real.BrownConfig.vocab_train_docs = 200"],
    )
    with settings.configured():
      gin_utils.configure_task_settings()  # What the entry point does after parsing.
      active = settings.get(real.BrownConfig)
      assert active.vocab_size == 300 and active.manual_dir == ""  # "" = the shared folder.
      assert active == brown
      assert real.resolve_manual_dir(active) == str(real.SHARED_DATA / "brown")
      assert len(real.active_corpus("brown").doc_ids) == 4690
      vocab = seqio.get_mixture_or_task("lmindexer.brown.index").output_features["inputs"]
      assert vocab.vocabulary.vocab_size == real.vocabulary(brown).vocab_size
  finally:
    gin.clear_config()
  assert settings.get(real.BrownConfig) == real.BrownConfig()
