"""TFDS builder `lmindexer_esci`: Amazon Shopping Queries (ESCI) for product search.

Manual dir (the dataset repo's files; parquet, or CSV with the same columns):
  shopping_queries_dataset_examples.parquet   query_id, query, product_id, product_locale,
                                              esci_label (E/S/C/I or the full words), split.
  shopping_queries_dataset_products.parquet   product_id, product_locale, product_title,
                                              product_description, product_bullet_point,
                                              product_brand, product_color.

Splits (fields: `tasks.tfds.common`; line numbers in errors are 1-based rows):
  corpus        the products of the config's locale: doc_id (= product_id; `<locale>/<id>` in
                config `all`), doc_index, title (= product_title), labels ([]), and text
                `title: ..., description: ..., brand: ..., color: ..., bullet points: ...`
                (fields present only).
  train / test  from the `split` column, one example per query: query_id, query,
                relevant_doc_ids (products labelled E: exact, as LMIndexer), plus every judged
                product in `judged_doc_ids` with its label (E, S, C or I) in `esci_labels`.
                Queries without an exact product are kept, with empty relevant_doc_ids.

Configs: `us` (LMIndexer's Amazon 2014 domains are US products), `es`, `jp`, and `all`.
"""

from __future__ import annotations

from collections.abc import Iterator
import csv
import dataclasses
import io
from typing import Any

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from tasks.tfds import common
from tasks.tfds import readers

_EXAMPLES = "shopping_queries_dataset_examples"
_PRODUCTS = "shopping_queries_dataset_products"
_EXAMPLE_COLUMNS = ("query_id", "query", "product_id", "product_locale", "esci_label", "split")
_PRODUCT_COLUMNS = (
  "product_id",
  "product_locale",
  "product_title",
  "product_description",
  "product_bullet_point",
  "product_brand",
  "product_color",
)
_TEXT_FIELDS = {
  "title": "product_title",
  "description": "product_description",
  "brand": "product_brand",
  "color": "product_color",
  "bullet points": "product_bullet_point",
}
_LABELS = {"e": "E", "s": "S", "c": "C", "i": "I"}
_LABELS.update(exact="E", substitute="S", complement="C", irrelevant="I")
_SPLITS = ("train", "test")


@dataclasses.dataclass(eq=False)
class EsciConfig(common.Config):
  """Attributes: locale ('us', 'es', 'jp', or 'all' for every locale)."""

  locale: str = "us"


def iter_table(path: epath.Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(row, {column: value})`, with 1-based rows, from a parquet or CSV file."""
  if path.name.endswith(".parquet"):
    import pyarrow.parquet as pq  # Only this builder needs pyarrow.

    with path.open("rb") as f:
      table = pq.ParquetFile(f)
      missing = [c for c in columns if c not in table.schema_arrow.names]
      if missing:
        raise readers.DataError(path, None, missing[0], "missing column")
      row = 0
      for batch in table.iter_batches(batch_size=8192, columns=list(columns)):
        for rec in batch.to_pylist():
          row += 1
          yield row, rec
    return
  with path.open("rb") as f:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise readers.DataError(path, 1, missing[0], "missing column")
    for row, rec in enumerate(reader, start=1):
      for column in columns:
        value = rec[column]
        if value is not None and readers.invalid_unicode(value):
          raise readers.DataError(path, row, column, "invalid UTF-8")
      yield row, {c: (rec[c] if rec[c] != "" else None) for c in columns}


def _find_table(root: epath.Path, stem: str) -> epath.Path:
  for ext in (".parquet", ".csv"):
    if (root / f"{stem}{ext}").exists():
      return root / f"{stem}{ext}"
  return readers.require_file(root, f"{stem}.parquet")


def _value(rec: dict[str, Any], column: str, path: epath.Path, row: int) -> str:
  value = rec[column]
  if value is None:
    return ""
  if isinstance(value, bool) or not isinstance(value, str | int):
    raise readers.DataError(path, row, column, f"expected a string, got {type(value).__name__}")
  return str(value).strip()


class Esci(common.Builder):
  """Shopping Queries (ESCI): queries, products and E/S/C/I relevance labels."""

  name = "lmindexer_esci"
  KINDS = (common.CORPUS, common.QUERIES)
  BUILDER_CONFIGS = [
    EsciConfig(name="us", locale="us", description="US queries and products."),
    EsciConfig(name="es", locale="es", description="Spanish queries and products."),
    EsciConfig(name="jp", locale="jp", description="Japanese queries and products."),
    EsciConfig(name="all", locale="all", description="All locales; ids are `<locale>/<id>`."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://github.com/amazon-science/esci-data (shopping_queries_dataset/) put
  shopping_queries_dataset_examples.parquet and shopping_queries_dataset_products.parquet (or
  CSV exports with the same columns) directly in manual_dir.
  """
  HOMEPAGE = "https://github.com/amazon-science/esci-data"
  CITATION = """@article{reddy2022shopping,
  title={Shopping Queries Dataset: A Large-Scale {ESCI} Benchmark for Improving Product Search},
  author={Reddy, Chandan K. and others},
  journal={arXiv preprint arXiv:2206.06588},
  year={2022}}"""

  @classmethod
  def query_features(cls):
    return {
      **common.query_features(),
      "judged_doc_ids": tfds.features.Sequence(
        tfds.features.Text(), doc="Every judged product of the query."
      ),
      "esci_labels": tfds.features.Sequence(
        tfds.features.Text(), doc="E, S, C or I for each of judged_doc_ids."
      ),
    }

  def _doc_id(self, rec: dict[str, Any], path: epath.Path, row: int) -> str | None:
    """The product's doc id, or None if it is outside the config's locale."""
    locale = _value(rec, "product_locale", path, row)
    if self.builder_config.locale not in ("all", locale):
      return None
    product = readers.as_id(_value(rec, "product_id", path, row), path, row, "product_id")
    return f"{locale}/{product}" if self.builder_config.locale == "all" else product

  def _read_products(self, path: epath.Path) -> Iterator[tuple[int, readers.Document]]:
    for row, rec in iter_table(path, _PRODUCT_COLUMNS):
      doc_id = self._doc_id(rec, path, row)
      if doc_id is None:
        continue
      values = {name: _value(rec, column, path, row) for name, column in _TEXT_FIELDS.items()}
      text = ", ".join(f"{name}: {value}" for name, value in values.items() if value)
      yield row, readers.Document(doc_id, text, values["title"])

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    products_path = _find_table(root, _PRODUCTS)
    corpus = readers.Corpus(
      products_path,
      lambda: self._read_products(products_path),
      id_field="product_id",
      text_field="product_title",
      empty_documents=self.empty_documents,
    )
    splits = {common.CORPUS: self._corpus_examples(corpus)}
    by_split = {split: [] for split in _SPLITS}
    for query in self._read_examples(_find_table(root, _EXAMPLES), corpus):
      by_split[query.pop("split")].append(query)
    for split, rows in by_split.items():
      self._add_query_split(splits, split, rows, root / _EXAMPLES)
    return splits

  def _read_examples(self, path: epath.Path, corpus: readers.Corpus) -> list[dict[str, Any]]:
    """One record per query (with its split), in first-appearance order."""
    queries: dict[str, dict[str, Any]] = {}
    ids = readers.Ids(path, "query", self.empty_documents)
    judged: set[tuple[str, str]] = set()
    dropped = {"pairs naming skipped empty products": 0, "duplicate pairs": 0}
    other_locales = 0
    for row, rec in iter_table(path, _EXAMPLE_COLUMNS):
      doc_id = self._doc_id(rec, path, row)
      if doc_id is None:
        other_locales += 1
        continue
      qid = readers.as_id(_value(rec, "query_id", path, row), path, row, "query_id")
      text, split = _value(rec, "query", path, row), _value(rec, "split", path, row)
      label = _LABELS.get(_value(rec, "esci_label", path, row).lower())
      if label is None:
        raise readers.DataError(path, row, "esci_label", f"not E/S/C/I: {rec['esci_label']!r}")
      if split not in _SPLITS:
        raise readers.DataError(path, row, "split", f"not train/test: {rec['split']!r}")
      if qid in queries or qid in ids.skipped:
        query = queries.get(qid)
        if query is not None and (query["query"], query["split"]) != (text, split):
          field = "query" if query["query"] != text else "split"
          raise readers.DataError(path, row, field, f"differs from query {qid!r}'s first row")
      elif ids.add(qid, not text, row, "query_id", "query"):
        queries[qid] = {
          "query_id": qid,
          "query": text,
          "split": split,
          "relevant_doc_ids": [],
          "judged_doc_ids": [],
          "esci_labels": [],
        }
      doc_kept = corpus.ids.resolve(doc_id, path, row, "product_id")
      if qid not in queries:
        continue  # An empty query; counted by ids.log_skipped.
      if not doc_kept:
        dropped["pairs naming skipped empty products"] += 1
      elif (qid, doc_id) in judged:
        dropped["duplicate pairs"] += 1
      else:
        judged.add((qid, doc_id))
        query = queries[qid]
        query["judged_doc_ids"].append(doc_id)
        query["esci_labels"].append(label)
        if label == "E":
          query["relevant_doc_ids"].append(doc_id)
    if other_locales:
      logging.info(
        "%s: %d rows of other locales than %r", path, other_locales, self.builder_config.locale
      )
    ids.log_skipped()
    for what, count in dropped.items():
      readers.log_dropped(path, count, f"{what} left out")
    no_exact = sum(not q["relevant_doc_ids"] for q in queries.values())
    if no_exact:
      logging.info("%s: %d queries have no exact (E) product", path, no_exact)
    return list(queries.values())
