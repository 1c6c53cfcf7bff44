"""TFDS builder `lmindexer_beir`: a BEIR-like folder, optionally with category labels.

Manual dir (one folder per config):
  corpus.jsonl                 `{"_id", "text", "title" (optional)}` per line.
  queries.jsonl                optional: `{"_id", "text"}` per line; needed if qrels/ exists.
  qrels/{train,dev,test}.tsv   optional: `query-id corpus-id score` (tab or space, header allowed,
                               TREC 4-column lines too); score <= 0 means not relevant.
  labels.tsv                   optional: `doc_id<TAB>category path` (`Tops/Knits`); a header
                               `doc_id category ...` is allowed and its `category` column is used.
Other files (e.g. womens_clothing_reviews' `meta.tsv`) are ignored.

Splits (fields: `tasks.tfds.common`):
  corpus      doc_id, doc_index, title, text (`title. body`), labels (path levels, may be empty).
  train / validation / test   from qrels/train.tsv, dev.tsv, test.tsv if present: query_id,
              query, relevant_doc_ids. Only queries with a relevant document are stored.

Configs: `brown` and `womens_clothing_reviews` (the sets in shared/data), and `default` for any
other folder. They differ only in name, so each folder prepares into its own data_dir entry.
"""

from __future__ import annotations

from absl import logging

from tasks.tfds import common
from tasks.tfds import readers

_QREL_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


class Beir(common.Builder):
  """A BEIR-like retrieval folder (corpus, queries, qrels) with optional category labels."""

  name = "lmindexer_beir"
  KINDS = (common.CORPUS, common.QUERIES)
  BUILDER_CONFIGS = [
    common.Config(name="default", description="Any folder in the BEIR-like layout."),
    common.Config(
      name="brown",
      description="Brown corpus passages with 15 genre paths; corpus only (shared/data/brown).",
    ),
    common.Config(
      name="womens_clothing_reviews",
      description="22.6k clothing reviews with department/class paths; corpus only.",
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point manual_dir at the folder itself: it holds corpus.jsonl and optionally queries.jsonl,
  qrels/{train,dev,test}.tsv and labels.tsv (see `tasks/tfds/beir.py`). BEIR sets unpack into
  this layout as they are; the Brown and Women's Clothing folders live in shared/data.
  """
  HOMEPAGE = "https://github.com/beir-cellar/beir"

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    corpus_path = readers.require_file(root, "corpus.jsonl")
    corpus = readers.Corpus(
      corpus_path,
      lambda: readers.read_jsonl_documents(corpus_path),
      id_field="_id",
      text_field="text",
      empty_documents=self.empty_documents,
    )
    if (root / "labels.tsv").exists():
      corpus.labels = readers.read_labels(root / "labels.tsv", corpus)
    splits = {common.CORPUS: self._corpus_examples(corpus)}

    qrels = {
      split: root / "qrels" / f"{stem}.tsv"
      for stem, split in _QREL_SPLITS.items()
      if (root / "qrels" / f"{stem}.tsv").exists()
    }
    if not qrels:
      if (root / "queries.jsonl").exists():
        logging.warning("%s: queries.jsonl but no qrels/*.tsv: no query splits", root)
      return splits
    queries = readers.read_jsonl_queries(
      readers.require_file(root, "queries.jsonl"), self.empty_documents
    )
    judged = set()
    for split, path in qrels.items():
      rows = readers.query_rows(queries, readers.read_qrels(path, queries, corpus))
      judged.update(row["query_id"] for row in rows)
      self._add_query_split(splits, split, rows, path)
    readers.log_dropped(
      queries.ids.path,
      len(queries.text) - len(judged),
      "queries without a relevant document in qrels/ left out",
    )
    return splits
