"""TFDS builder `lmindexer_nq320k`: Natural Questions 320k in the DSI/NCI layout.

Manual dir (the output of NCI's `NQ_dataset_Process.ipynb`, as LMIndexer uses it):
  corpus.tsv    `docid<TAB>text` per line (a `docid text` header line is allowed).
  train.csv     `query<TAB>docid[,docid...]` per line, no header; 307,373 queries.
  test.csv      the same; 7,830 queries (NQ dev).
  dev.csv       optional; the same.

Splits (fields: `tasks.tfds.common`):
  corpus                     doc_id, doc_index, title (''), text, labels ([]).
  train / validation / test  query_id (`<split>-<row>`, 0-based), query, relevant_doc_ids.
"""

from __future__ import annotations

from tasks.tfds import common
from tasks.tfds import readers

_QUERY_FILES = {"train": "train.csv", "validation": "dev.csv", "test": "test.csv"}


class Nq320k(common.Builder):
  """NQ320k (109,739 Wikipedia documents) with NQ train and dev queries, DSI/NCI layout."""

  name = "lmindexer_nq320k"
  KINDS = (common.CORPUS, common.QUERIES)
  BUILDER_CONFIGS = [common.Config(name="default", description="corpus.tsv, train.csv, test.csv")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Run NCI's NQ_dataset_Process.ipynb (or take LMIndexer's processed `NQ_aug` folder) and place
  corpus.tsv, train.csv, test.csv (and optionally dev.csv) directly in manual_dir.
  """
  HOMEPAGE = "https://ai.google.com/research/NaturalQuestions"
  CITATION = """@article{kwiatkowski2019natural,
  title={Natural Questions: a Benchmark for Question Answering Research},
  author={Kwiatkowski, Tom and others},
  journal={Transactions of the Association for Computational Linguistics},
  year={2019}}"""

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    corpus = readers.tsv_corpus(
      root, "corpus.tsv", id_field="docid", text_field="text", empty_documents=self.empty_documents
    )
    splits = {common.CORPUS: self._corpus_examples(corpus)}
    for split, name in _QUERY_FILES.items():
      if split == "validation" and not (root / name).exists():
        continue
      path = readers.require_file(root, name)
      rows = readers.read_query_docids(path, corpus, split, self.empty_documents)
      self._add_query_split(splits, split, rows, path)
    return splits
