"""Tests of the TFDS builders in `tasks.tfds`.

Each builder is built from a small fixture that the test writes into a tmp manual_dir. The
tests check schema and values, that bad input raises `DataError` at the right file:line:field,
and that the real sets in `../shared/data` build with the counts in their SOURCE.md.
"""

import collections
from concurrent import futures
import gzip
import json
import logging
import multiprocessing
import pathlib
import statistics

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks import tfds as builders
from tasks.tfds import amazon2014
from tasks.tfds import common
from tasks.tfds import readers

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

STR, INT = (tf.string, ()), (tf.int64, ())
STRS = (tf.string, (None,))
SCHEMA = {
  common.CORPUS: {"doc_id": STR, "doc_index": INT, "title": STR, "text": STR, "labels": STRS},
  common.QUERIES: {"query_id": STR, "query": STR, "relevant_doc_ids": STRS},
  common.SEQUENCES: {"user_id": STR, "item_ids": STRS},
}


def write(path: pathlib.Path, lines) -> pathlib.Path:
  """Writes lines (str, bytes, or dicts as JSON) with '\\n' endings; gzips `*.gz`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  data = b"".join(
    (line if isinstance(line, bytes) else _text(line).encode("utf-8")) + b"\n" for line in lines
  )
  path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
  return path


def _text(line) -> str:
  return json.dumps(line) if isinstance(line, dict) else line


def build(builder, manual_dir, data_dir, config=None):
  return builders.load_splits(
    builder, manual_dir=manual_dir, data_dir=data_dir, config=config, as_lists=True
  )


def check_schema(builder, config, manual_dir, data_dir, extra_query_fields=()):
  """Stored features = union of the kinds' schemas; each split yields only its own fields."""
  b = builders.prepare(builder, manual_dir=manual_dir, data_dir=data_dir, config=config)
  want = {}
  for kind in b.KINDS:
    want.update(SCHEMA[kind])
  if common.QUERIES in b.KINDS:
    want.update({name: STRS for name in extra_query_fields})
  got = {k: (v.dtype, v.shape) for k, v in b.info.features.get_tensor_info().items()}
  assert got == want
  datasets = builders.load_splits(builder, manual_dir=manual_dir, data_dir=data_dir, config=config)
  for split, ds in datasets.items():
    kind = common.split_kind(split)
    own = dict(SCHEMA[kind], **({n: STRS for n in extra_query_fields} if kind == "queries" else {}))
    assert {k: (s.dtype, tuple(s.shape)) for k, s in ds.element_spec.items()} == own, split
  return b


def assert_data_error(excinfo, name, line, field):
  err = excinfo.value
  assert pathlib.Path(err.path).name == name, str(err)
  assert (err.line, err.field) == (line, field), str(err)
  where = f"{name}:{line}" if line is not None else name
  assert where in str(err)
  if field is not None:
    assert f"field '{field}'" in str(err)


# ---------------------------------------------------------------------------------------------
# Fixtures of each layout.


def beir_folder(root: pathlib.Path) -> pathlib.Path:
  write(
    root / "corpus.jsonl",
    [
      {"_id": "d1", "title": "Knit top", "text": "Soft cotton."},
      {"_id": "d2", "text": "A denim jacket."},
      {"_id": "d3", "title": "", "text": "  \t "},  # Empty: skipped and counted.
      "",  # A blank line is not a record.
      {"_id": 4, "title": "Great!", "text": "Fits well."},  # Integer ids become strings.
    ],
  )
  write(
    root / "queries.jsonl",
    [
      {"_id": "q1", "text": "cotton top"},
      {"_id": "q2", "text": "jacket"},
      {"_id": "q3", "text": "judged not relevant"},
      {"_id": "q4", "text": "fits"},
    ],
  )
  write(
    root / "qrels" / "train.tsv",
    ["query-id\tcorpus-id\tscore", "q2\td2\t1", "q1\td1\t2", "q2\td3\t1", "q3\td1\t0"],
  )
  write(root / "qrels" / "test.tsv", ["q4 0 4 1"])  # TREC 4-column lines work too.
  write(
    root / "labels.tsv",
    ["doc_id\tcategory\tsource", "d1\tTops/Knits\tx", "d2\tJackets/Outerwear/\tx", "d3\tTops\tx"],
  )
  return root


def items_folder(root: pathlib.Path) -> pathlib.Path:
  write(
    root / "items.jsonl",
    [
      {"item_id": "i1", "text": "Toy Story (1995)", "category": "Animation|Comedy"},
      {"item_id": "i2", "text": "Heat (1995)", "category": ["Action", "Crime"]},
      {"item_id": "i3", "text": " "},  # Empty: skipped, and left out of histories.
      {"item_id": "i4", "text": "Fargo (1996)", "category": "Crime/Noir"},
    ],
  )
  write(
    root / "sequences.jsonl",
    [
      {"user_id": "u1", "items": ["i2", "i3", "i1"]},
      {"user_id": 2, "items": ["i4", "i1", "i2"]},
      {"user_id": "u3", "items": ["i3"]},  # Empty once i3 is gone: left out, counted.
    ],
  )
  return root


def amazon_folder(root: pathlib.Path) -> pathlib.Path:
  """Beauty: U1-U5 x A-E form the 5-core. F (4 users), U6 (3 items), G and then U7 drop out."""
  reviews = []

  def review(user, item, time):
    reviews.append({"reviewerID": user, "asin": item, "unixReviewTime": time, "overall": 5.0})

  # U1's file order is A B C D E F. Sorted by time it is D E B C (F) A; B and C tie on time.
  for item, time in zip("ABCDEF", (50, 30, 30, 10, 20, 40), strict=True):
    review("U1", item, time)
  review("U6", "A", 1)
  for user in ("U2", "U3", "U4", "U5"):
    for i, item in enumerate("EDCBA"):
      review(user, item, 100 + i)
  for user in ("U2", "U3", "U4"):
    review(user, "F", 200)
  for item in "BC":
    review("U6", item, 2)
  for i, item in enumerate("ABCDG"):  # G has one user, and then U7 has four items.
    review("U7", item, 300 + i)
  write(root / "reviews_Beauty_5.json", reviews)
  meta = [
    "{'asin': 'E', 'title': 'Eye Cream', 'related': {'also_bought': ['A']}}",
    "{'asin': 'X', 'title': 'Not reviewed'}",
    "{'asin': 'A', 'title': 'Rose Lotion', 'description': 'Soft skin.', 'brand': 'Acme', "
    "'price': 12.5, 'categories': [['Beauty', 'Skin Care', 'Body'], ['Gifts']]}",
    "{'asin': 'B', 'categories': [['Beauty']]}",
    "{'asin': 'F', 'title': 'Filtered out'}",
    "{'asin': 'C', 'title': 'Comb', 'price': 3, 'brand': ''}",
    "{'asin': 'D', 'title': 'Dye', 'imUrl': 'http://x', 'salesRank': {'Beauty': 7}}",
    "{'asin': 'G', 'title': 'Gel'}",
  ]
  write(root / "meta_Beauty.json.gz", meta)  # Gzipped, as downloaded.
  return root


def esci_tables(root: pathlib.Path, fmt: str = "parquet") -> pathlib.Path:
  import pyarrow as pa
  import pyarrow.csv as pcsv
  import pyarrow.parquet as pq

  products = {
    "product_id": ["P1", "P2", "P3", "P1", "P9"],
    "product_locale": ["us", "us", "us", "es", "es"],
    "product_title": ["Trail shoe", "Road shoe", "Sock", "Zapatilla", "Calcetín"],
    "product_description": ["Grippy.", None, None, None, None],
    "product_bullet_point": ["Light\nWaterproof", None, None, None, None],
    "product_brand": ["Acme", "Acme", None, None, None],
    "product_color": ["red", None, None, None, None],
  }
  examples = {
    "example_id": [0, 1, 2, 3, 4, 5],
    "query": ["running shoes", "running shoes", "running shoes", "zapatillas", "sock", "sock"],
    "query_id": [1, 1, 1, 2, 3, 3],
    "product_id": ["P1", "P2", "P3", "P1", "P3", "P2"],
    "product_locale": ["us", "us", "us", "es", "us", "us"],
    "esci_label": ["E", "S", "I", "E", "exact", "C"],
    "small_version": [1, 1, 1, 0, 1, 1],
    "large_version": [1, 1, 1, 1, 1, 1],
    "split": ["train", "train", "train", "train", "test", "test"],
  }
  root.mkdir(parents=True, exist_ok=True)
  for stem, data in (("products", products), ("examples", examples)):
    table = pa.table(data)
    path = root / f"shopping_queries_dataset_{stem}.{fmt}"
    (pq.write_table if fmt == "parquet" else pcsv.write_csv)(table, path)
  return root


def nq_folder(root: pathlib.Path) -> pathlib.Path:
  write(root / "corpus.tsv", ["docid\ttext", "0\tAlpha doc.", "1\tBeta\twith a tab.", "2\t  "])
  write(root / "train.csv", ["what is alpha\t0", "beta or alpha\t1,0", "only empty\t2"])
  write(root / "test.csv", ["tell me beta\t1"])
  return root


def msmarco_folder(root: pathlib.Path) -> pathlib.Path:
  write(root / "collection.tsv", ["0\tpassage zero", "1\tpassage one", "7\tpassage seven"])
  write(root / "queries.train.tsv", ["100\tq one", "101\tq two", "102\tno judgement"])
  write(root / "qrels.train.tsv", ["100\t0\t1\t1", "101\t0\t7\t1", "101\t0\t0\t1"])
  write(root / "queries.dev.tsv", ["200\tdev q"])
  write(root / "qrels.dev.tsv", ["200 0"])  # Two columns, space-separated.
  return root


# ---------------------------------------------------------------------------------------------
# Builders on fixtures: schema and values.


def test_beir_builds_corpus_queries_and_labels(tmp_path, caplog):
  manual = beir_folder(tmp_path / "manual")
  with caplog.at_level(logging.INFO):
    splits = build("lmindexer_beir", manual, tmp_path / "data")
  assert sorted(splits) == ["corpus", "test", "train"]
  assert splits["corpus"] == [
    {
      "doc_id": "d1",
      "doc_index": 0,
      "title": "Knit top",
      "text": "Knit top. Soft cotton.",
      "labels": ["Tops", "Knits"],
    },
    {
      "doc_id": "d2",
      "doc_index": 1,
      "title": "",
      "text": "A denim jacket.",
      "labels": ["Jackets", "Outerwear"],
    },
    {"doc_id": "4", "doc_index": 2, "title": "Great!", "text": "Great! Fits well.", "labels": []},
  ]
  # Query-file order; the judgement of the skipped d3 and q3's score 0 are left out.
  assert splits["train"] == [
    {"query_id": "q1", "query": "cotton top", "relevant_doc_ids": ["d1"]},
    {"query_id": "q2", "query": "jacket", "relevant_doc_ids": ["d2"]},
  ]
  assert splits["test"] == [{"query_id": "q4", "query": "fits", "relevant_doc_ids": ["4"]}]
  log = caplog.text
  assert "1 empty documents skipped" in log
  assert "1 label lines for skipped empty documents left out" in log
  assert "1 judgements naming skipped empty documents left out" in log
  assert "1 judgements with score <= 0" in log
  assert "1 queries without a relevant document" in log
  check_schema("lmindexer_beir", None, manual, tmp_path / "data")


def test_item_sequences_builds_items_and_histories(tmp_path, caplog):
  manual = items_folder(tmp_path / "manual")
  with caplog.at_level(logging.INFO):
    splits = build("lmindexer_item_sequences", manual, tmp_path / "data")
  assert [(d["doc_id"], d["doc_index"], d["text"], d["labels"]) for d in splits["corpus"]] == [
    ("i1", 0, "Toy Story (1995)", ["Animation|Comedy"]),
    ("i2", 1, "Heat (1995)", ["Action", "Crime"]),
    ("i4", 2, "Fargo (1996)", ["Crime", "Noir"]),
  ]
  assert splits["sequences"] == [
    {"user_id": "u1", "item_ids": ["i2", "i1"]},
    {"user_id": "2", "item_ids": ["i4", "i1", "i2"]},
  ]
  assert "2 interactions with skipped empty items left out" in caplog.text
  assert "1 users with an empty history left out" in caplog.text
  check_schema("lmindexer_item_sequences", None, manual, tmp_path / "data")


def test_amazon_5core_order_and_item_text(tmp_path, caplog):
  manual = amazon_folder(tmp_path / "manual")
  with caplog.at_level(logging.INFO):
    splits = build("lmindexer_amazon2014/beauty", manual, tmp_path / "data")
  assert "5-core keeps 5 of 7 users, 5 of 7 items, 25 of 37 interactions" in caplog.text
  assert splits["sequences"] == [
    {"user_id": "U1", "item_ids": ["D", "E", "B", "C", "A"]},
    {"user_id": "U2", "item_ids": ["E", "D", "C", "B", "A"]},
    {"user_id": "U3", "item_ids": ["E", "D", "C", "B", "A"]},
    {"user_id": "U4", "item_ids": ["E", "D", "C", "B", "A"]},
    {"user_id": "U5", "item_ids": ["E", "D", "C", "B", "A"]},
  ]
  corpus = splits["corpus"]
  assert [(d["doc_id"], d["doc_index"]) for d in corpus] == [
    ("E", 0),
    ("A", 1),
    ("B", 2),
    ("C", 3),
    ("D", 4),
  ]
  assert corpus[1] == {
    "doc_id": "A",
    "doc_index": 1,
    "title": "Rose Lotion",
    "text": "title: Rose Lotion, description: Soft skin., brand: Acme, price: 12.5, "
    "category: Beauty, Skin Care, Body",
    "labels": ["Beauty", "Skin Care", "Body"],
  }
  assert corpus[2]["text"] == "category: Beauty" and corpus[2]["title"] == ""
  assert corpus[3]["text"] == "title: Comb, price: 3" and corpus[3]["labels"] == []
  check_schema("lmindexer_amazon2014", "beauty", manual, tmp_path / "data")


def test_amazon_item_without_text_is_skipped_then_core_is_redone(tmp_path, caplog):
  manual = tmp_path / "manual"
  reviews = [
    {"reviewerID": f"U{u}", "asin": item, "unixReviewTime": t}
    for u in range(5)
    for t, item in enumerate("ABCDEF")
  ]
  reviews += [{"reviewerID": "U9", "asin": item, "unixReviewTime": 0} for item in "ABCDF"]
  write(manual / "reviews_Toys_and_Games_5.json", reviews)
  # F has no text: without it U9 has 4 items, so the redone 5-core drops U9 too.
  meta = [repr({"asin": item, "title": f"Toy {item}"}) for item in "ABCDE"] + ["{'asin': 'F'}"]
  write(manual / "meta_Toys_and_Games.json", meta)
  with caplog.at_level(logging.INFO):
    splits = build("lmindexer_amazon2014/toys_and_games", manual, tmp_path / "data")
  assert [d["doc_id"] for d in splits["corpus"]] == list("ABCDE")
  assert [s["user_id"] for s in splits["sequences"]] == [f"U{u}" for u in range(5)]
  assert "1 empty documents skipped" in caplog.text
  strict = amazon2014.AmazonConfig(name="strict", domain="Toys_and_Games", empty_documents="error")
  with pytest.raises(readers.DataError) as excinfo:
    build(builders.Amazon2014, manual, tmp_path / "data", config=strict)
  assert_data_error(excinfo, "meta_Toys_and_Games.json", 6, "title")


def test_k_core_is_iterative():
  # c has one user; without it u3 has one item, so u3 goes in the second round.
  histories = {"u1": list("ab"), "u2": list("ba"), "u3": list("ac")}
  assert amazon2014.k_core(histories, 2) == {"u1": list("ab"), "u2": list("ba")}
  assert amazon2014.k_core(histories, 1) == histories
  assert amazon2014.k_core(histories, 3) == {}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_esci_groups_judgements_per_query(tmp_path, fmt):
  manual = esci_tables(tmp_path / "manual", fmt)
  splits = build("lmindexer_esci/us", manual, tmp_path / "data")
  assert [(d["doc_id"], d["doc_index"], d["title"]) for d in splits["corpus"]] == [
    ("P1", 0, "Trail shoe"),
    ("P2", 1, "Road shoe"),
    ("P3", 2, "Sock"),
  ]
  assert splits["corpus"][0]["text"] == (
    "title: Trail shoe, description: Grippy., brand: Acme, color: red, "
    "bullet points: Light\nWaterproof"
  )
  assert splits["train"] == [
    {
      "query_id": "1",
      "query": "running shoes",
      "relevant_doc_ids": ["P1"],
      "judged_doc_ids": ["P1", "P2", "P3"],
      "esci_labels": ["E", "S", "I"],
    }
  ]
  assert splits["test"] == [
    {
      "query_id": "3",
      "query": "sock",
      "relevant_doc_ids": ["P3"],
      "judged_doc_ids": ["P3", "P2"],
      "esci_labels": ["E", "C"],
    }
  ]
  if fmt == "parquet":
    extra = ("judged_doc_ids", "esci_labels")
    check_schema("lmindexer_esci", "us", manual, tmp_path / "data", extra_query_fields=extra)
    every = build("lmindexer_esci/all", manual, tmp_path / "data")
    assert [d["doc_id"] for d in every["corpus"]] == ["us/P1", "us/P2", "us/P3", "es/P1", "es/P9"]
    assert [q["relevant_doc_ids"] for q in every["train"]] == [["us/P1"], ["es/P1"]]


def test_nq320k_corpus_and_query_files(tmp_path, caplog):
  manual = nq_folder(tmp_path / "manual")
  with caplog.at_level(logging.INFO):
    splits = build("lmindexer_nq320k", manual, tmp_path / "data")
  assert [(d["doc_id"], d["doc_index"], d["text"]) for d in splits["corpus"]] == [
    ("0", 0, "Alpha doc."),
    ("1", 1, "Beta\twith a tab."),
  ]
  assert splits["train"] == [
    {"query_id": "train-0", "query": "what is alpha", "relevant_doc_ids": ["0"]},
    {"query_id": "train-1", "query": "beta or alpha", "relevant_doc_ids": ["1", "0"]},
  ]
  assert splits["test"] == [
    {"query_id": "test-0", "query": "tell me beta", "relevant_doc_ids": ["1"]}
  ]
  assert "1 queries with no relevant document left out" in caplog.text
  check_schema("lmindexer_nq320k", None, manual, tmp_path / "data")


def test_msmarco_reads_trec_and_two_column_qrels(tmp_path, caplog):
  manual = msmarco_folder(tmp_path / "manual")
  with caplog.at_level(logging.INFO):
    splits = build("lmindexer_msmarco_passage", manual, tmp_path / "data")
  assert [d["doc_id"] for d in splits["corpus"]] == ["0", "1", "7"]
  assert splits["train"] == [
    {"query_id": "100", "query": "q one", "relevant_doc_ids": ["1"]},
    {"query_id": "101", "query": "q two", "relevant_doc_ids": ["7", "0"]},
  ]
  assert splits["validation"] == [{"query_id": "200", "query": "dev q", "relevant_doc_ids": ["0"]}]
  assert "1 queries without a relevant passage" in caplog.text
  check_schema("lmindexer_msmarco_passage", None, manual, tmp_path / "data")


def test_dataset_fn_reads_a_split_for_seqio(tmp_path):
  manual = items_folder(tmp_path / "manual")
  fn = builders.dataset_fn("lmindexer_item_sequences", manual_dir=manual, data_dir=tmp_path)
  ds = fn("sequences", shuffle_files=False)
  assert set(ds.element_spec) == {"user_id", "item_ids"}
  assert [ex["user_id"] for ex in ds.as_numpy_iterator()] == [b"u1", b"2"]


def _prepare_after(barrier, manual, data_dir):
  barrier.wait()  # Every process starts to prepare at once.
  b = builders.prepare("lmindexer_item_sequences", manual_dir=manual, data_dir=data_dir)
  return [ex["user_id"] for ex in tfds.as_numpy(b.as_dataset(split="sequences"))]


def test_processes_preparing_at_once_all_read_the_data(tmp_path):
  """Without a lock the losers of TFDS's final rename fail (FileExistsError)."""
  manual = items_folder(tmp_path / "manual")
  context = multiprocessing.get_context("spawn")
  with context.Manager() as manager, futures.ProcessPoolExecutor(3, mp_context=context) as pool:
    barrier = manager.Barrier(3)
    done = [pool.submit(_prepare_after, barrier, manual, tmp_path / "data") for _ in range(3)]
    assert [f.result(timeout=300) for f in done] == [[b"u1", b"2"]] * 3


# ---------------------------------------------------------------------------------------------
# Bad input: one DataError naming file, line and field.

GOOD_DOC = {"_id": "d1", "text": "fine"}
STRICT = common.Config(name="strict", empty_documents="error")


def _beir(corpus_lines, **extra):
  files = {"corpus.jsonl": corpus_lines}
  files.update(extra)
  return files


BAD_INPUT = {
  "missing text field": (
    "lmindexer_beir",
    _beir([GOOD_DOC, {"_id": "d2", "title": "no text"}]),
    None,
    ("corpus.jsonl", 2, "text"),
  ),
  "text not a string": (
    "lmindexer_beir",
    _beir([GOOD_DOC, {"_id": "d2", "text": ["a"]}]),
    None,
    ("corpus.jsonl", 2, "text"),
  ),
  "empty document (error policy)": (
    "lmindexer_beir",
    _beir([GOOD_DOC, {"_id": "d2", "title": " ", "text": " \t "}]),
    STRICT,
    ("corpus.jsonl", 2, "text"),
  ),
  "duplicate doc id": (
    "lmindexer_beir",
    _beir([GOOD_DOC, {"_id": "d2", "text": "x"}, {"_id": "d1", "text": "y"}]),
    None,
    ("corpus.jsonl", 3, "_id"),
  ),
  "invalid UTF-8": (
    "lmindexer_beir",
    _beir([GOOD_DOC, b'{"_id": "d2", "title": "ok", "text": "caf\xe9"}']),
    None,
    ("corpus.jsonl", 2, "text"),
  ),
  "lone surrogate": (
    "lmindexer_beir",
    _beir([GOOD_DOC, '{"_id": "d2", "text": "bad \\ud800"}']),
    None,
    ("corpus.jsonl", 2, "text"),
  ),
  "invalid JSON": (
    "lmindexer_beir",
    _beir([GOOD_DOC, '{"_id": "d2", "text": "unterminated}']),
    None,
    ("corpus.jsonl", 2, None),
  ),
  "qrel naming an unknown document": (
    "lmindexer_beir",
    _beir(
      [GOOD_DOC],
      **{
        "queries.jsonl": [{"_id": "q1", "text": "a"}],
        "qrels/test.tsv": ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\tnope\t1"],
      },
    ),
    None,
    ("test.tsv", 3, "corpus-id"),
  ),
  "qrel naming an unknown query": (
    "lmindexer_beir",
    _beir(
      [GOOD_DOC],
      **{"queries.jsonl": [{"_id": "q1", "text": "a"}], "qrels/dev.tsv": ["q9\td1\t1"]},
    ),
    None,
    ("dev.tsv", 1, "query-id"),
  ),
  "labels line for an unknown document": (
    "lmindexer_beir",
    _beir([GOOD_DOC], **{"labels.tsv": ["doc_id\tcategory", "d1\ta/b", "d7\ta/c"]}),
    None,
    ("labels.tsv", 3, "doc_id"),
  ),
  "second labels line": (
    "lmindexer_beir",
    _beir([GOOD_DOC], **{"labels.tsv": ["d1\ta/b", "d1\ta/c"]}),
    None,
    ("labels.tsv", 2, "doc_id"),
  ),
  "history with an unknown item": (
    "lmindexer_item_sequences",
    {
      "items.jsonl": [{"item_id": "i1", "text": "a"}],
      "sequences.jsonl": [
        {"user_id": "u1", "items": ["i1"]},
        {"user_id": "u2", "items": ["i1", "i9"]},
      ],
    },
    None,
    ("sequences.jsonl", 2, "items"),
  ),
  "missing items list": (
    "lmindexer_item_sequences",
    {
      "items.jsonl": [{"item_id": "i1", "text": "a"}],
      "sequences.jsonl": [{"user_id": "u1", "item_ids": ["i1"]}],
    },
    None,
    ("sequences.jsonl", 1, "items"),
  ),
  "TSV corpus with invalid UTF-8": (
    "lmindexer_nq320k",
    {
      "corpus.tsv": ["0\tfine", b"1\tcaf\xe9"],
      "train.csv": ["q\t0"],
      "test.csv": ["q\t0"],
    },
    None,
    ("corpus.tsv", 2, "text"),
  ),
  "NQ query naming an unknown document": (
    "lmindexer_nq320k",
    {"corpus.tsv": ["0\tfine"], "train.csv": ["q\t0", "r\t0,5"], "test.csv": ["q\t0"]},
    None,
    ("train.csv", 2, "docid"),
  ),
  "MS MARCO TREC qrel naming an unknown passage": (
    "lmindexer_msmarco_passage",
    {
      "collection.tsv": ["0\tp"],
      "queries.train.tsv": ["1\tq"],
      "qrels.train.tsv": ["1\t0\t0\t1", "1\t0\t3\t1"],
    },
    None,
    ("qrels.train.tsv", 2, "corpus-id"),
  ),
  "MS MARCO qrel with five columns": (
    "lmindexer_msmarco_passage",
    {
      "collection.tsv": ["0\tp"],
      "queries.train.tsv": ["1\tq"],
      "qrels.train.tsv": ["1 0 0 1 x"],
    },
    None,
    ("qrels.train.tsv", 1, None),
  ),
  "Amazon meta line that only eval would read": (
    "lmindexer_amazon2014/beauty",
    {
      "reviews_Beauty_5.json": [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}],
      "meta_Beauty.json": ["{'asin': 'A', 'title': __import__('os').getcwd()}"],
    },
    None,
    ("meta_Beauty.json", 1, None),
  ),
  "Amazon review without a time": (
    "lmindexer_amazon2014/beauty",
    {
      "reviews_Beauty_5.json": [{"reviewerID": "u", "asin": "A", "unixReviewTime": 1}]
      + [{"reviewerID": "u", "asin": "B"}],
      "meta_Beauty.json": ["{'asin': 'A'}"],
    },
    None,
    ("reviews_Beauty_5.json", 2, "unixReviewTime"),
  ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_file_line_and_field(tmp_path, case):
  builder, files, config, (name, line, field) = BAD_INPUT[case]
  for rel, lines in files.items():
    write(tmp_path / "manual" / rel, lines)
  with pytest.raises(readers.DataError) as excinfo:
    build(builder, tmp_path / "manual", tmp_path / "data", config=config)
  assert_data_error(excinfo, name, line, field)


def test_amazon_core_item_without_meta(tmp_path):
  manual = amazon_folder(tmp_path / "manual")
  meta = gzip.decompress((manual / "meta_Beauty.json.gz").read_bytes()).decode().splitlines()
  write(manual / "meta_Beauty.json.gz", [m for m in meta if "'asin': 'B'" not in m])
  with pytest.raises(readers.DataError) as excinfo:
    build("lmindexer_amazon2014/beauty", manual, tmp_path / "data")
  assert_data_error(excinfo, "reviews_Beauty_5.json", 2, "asin")  # B's first review.


@pytest.mark.parametrize(
  ("column", "value", "field"),
  [("product_id", "P404", "product_id"), ("esci_label", "X", "esci_label")],
)
def test_esci_bad_rows(tmp_path, column, value, field):
  import pyarrow.parquet as pq

  manual = esci_tables(tmp_path / "manual")
  path = manual / "shopping_queries_dataset_examples.parquet"
  table = pq.read_table(path)
  values = table.column(column).to_pylist()
  values[4] = value
  pq.write_table(table.set_column(table.column_names.index(column), column, [values]), path)
  with pytest.raises(readers.DataError) as excinfo:
    build("lmindexer_esci/us", manual, tmp_path / "data")
  assert_data_error(excinfo, "shopping_queries_dataset_examples.parquet", 5, field)


def test_missing_file_and_bad_policy(tmp_path):
  write(tmp_path / "manual" / "items.jsonl", [{"item_id": "i1", "text": "a"}])
  with pytest.raises(readers.DataError) as excinfo:
    build("lmindexer_item_sequences", tmp_path / "manual", tmp_path / "data")
  assert_data_error(excinfo, "sequences.jsonl", None, None)
  with pytest.raises(ValueError, match="empty_documents"):
    common.Config(name="x", empty_documents="drop")


def test_readers_name_the_field_holding_bad_bytes(tmp_path):
  path = write(tmp_path / "x.jsonl", [b'{"a": {"b": ["ok", "caf\xe9"]}}'])
  with pytest.raises(readers.DataError) as excinfo:
    list(readers.iter_jsonl(path))
  assert (excinfo.value.line, excinfo.value.field) == (1, "a.b[1]")


# ---------------------------------------------------------------------------------------------
# The real sets in ../shared/data, with the counts stated in their SOURCE.md.


def _real(folder: str) -> pathlib.Path:
  path = SHARED_DATA / folder
  if not (path / "SOURCE.md").exists():
    pytest.skip(f"{path} is absent")
  return path


def _words(docs):
  counts = np.array([len(d["text"].split()) for d in docs])
  return np.median(counts), np.percentile(counts, 90), counts.max()


def test_real_brown(tmp_path):
  splits = build("lmindexer_beir/brown", _real("brown"), tmp_path)
  assert list(splits) == ["corpus"]  # No queries, no qrels.
  docs = splits["corpus"]
  assert len(docs) == 4690 and all(d["labels"] for d in docs)
  assert [d["doc_index"] for d in docs] == list(range(4690))
  assert collections.Counter(d["labels"][0] for d in docs) == {
    "informative": 3431,
    "imaginative": 1259,
  }
  paths = collections.Counter("/".join(d["labels"][1:]) for d in docs)
  assert paths == {
    "learned": 701,
    "belles_lettres": 659,
    "popular_lore": 438,
    "press/reportage": 429,
    "skill_and_hobbies": 339,
    "fiction/adventure": 298,
    "fiction/romance": 291,
    "miscellaneous/government_and_house_organs": 287,
    "fiction/general": 283,
    "press/editorial": 260,
    "fiction/mystery": 238,
    "religion": 150,
    "press/reviews": 168,
    "humor": 88,
    "fiction/science": 61,
  }
  assert _words(docs) == (206, 283, 455)


def test_real_womens_clothing_reviews(tmp_path):
  docs = build("lmindexer_beir/womens_clothing_reviews", _real("womens_clothing_reviews"), tmp_path)
  docs = docs["corpus"]
  assert len(docs) == 22641
  assert sum(bool(d["title"]) for d in docs) == 19675
  labelled = [d for d in docs if d["labels"]]
  assert len(labelled) == 22628
  assert collections.Counter(d["labels"][0] for d in labelled) == {
    "Tops": 10048,
    "Dresses": 6145,
    "Bottoms": 3662,
    "Intimate": 1653,
    "Jackets": 1002,
    "Trend": 118,
  }
  paths = collections.Counter("/".join(d["labels"]) for d in labelled)
  assert len(paths) == 20
  assert paths == {
    "Dresses/Dresses": 6145,
    "Tops/Knits": 4626,
    "Tops/Blouses": 2983,
    "Tops/Sweaters": 1380,
    "Bottoms/Pants": 1350,
    "Bottoms/Jeans": 1104,
    "Tops/Fine gauge": 1059,
    "Bottoms/Skirts": 903,
    "Jackets/Jackets": 683,
    "Intimate/Lounge": 669,
    "Intimate/Swim": 332,
    "Jackets/Outerwear": 319,
    "Bottoms/Shorts": 304,
    "Intimate/Sleep": 214,
    "Intimate/Legwear": 158,
    "Intimate/Intimates": 147,
    "Intimate/Layering": 132,
    "Trend/Trend": 118,
    "Bottoms/Casual bottoms": 1,
    "Intimate/Chemises": 1,
  }
  assert _words(docs) == (62, 102, 121)  # Title + text.


def test_real_ml100k(tmp_path):
  splits = build("lmindexer_item_sequences/ml100k", _real("ml100k"), tmp_path)
  items, sequences = splits["corpus"], splits["sequences"]
  assert len(items) == 1682 and len(sequences) == 943
  lengths = [len(s["item_ids"]) for s in sequences]
  assert sum(lengths) == 100_000
  assert (min(lengths), statistics.median(lengths), max(lengths)) == (20, 65, 737)
  assert round(statistics.mean(lengths), 1) == 106.0
  assert {i for s in sequences for i in s["item_ids"]} == {d["doc_id"] for d in items}
  assert all(len(set(s["item_ids"])) == len(s["item_ids"]) for s in sequences)
  genres = [d["labels"][0].split("|") for d in items]
  assert sum(len(g) > 1 for g in genres) == 849
  assert len({g for gs in genres for g in gs}) == 19
  texts = collections.Counter(d["text"] for d in items)
  assert sum(n for n in texts.values() if n > 1) == 36  # 18 movies listed under two ids.
