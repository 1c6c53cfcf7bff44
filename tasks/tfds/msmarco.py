"""TFDS builder `lmindexer_msmarco_passage`: the MS MARCO passage-ranking collection.

Manual dir (files of the MS MARCO passage task, unpacked):
  collection.tsv                     `pid<TAB>passage` (8,841,823 passages).
  queries.train.tsv, qrels.train.tsv train queries (`qid<TAB>query`) and judgements.
  queries.dev.tsv, qrels.dev.tsv     optional: dev queries and judgements.
Qrels lines may be TREC 4-column `qid 0 pid rel` or 2-column `qid pid` (tabs or spaces).

Splits (fields: `tasks.tfds.common`):
  corpus              doc_id (= pid), doc_index, title (''), text, labels ([]).
  train / validation  query_id (= qid), query, relevant_doc_ids. Only queries with a relevant
                      passage are stored (the rest are counted in the log).

The full collection is stored. LMIndexer's 1M-passage subset (reference section 4.5) is a
sampling step on top of this, and it is not done here.
"""

from __future__ import annotations

from tasks.tfds import common
from tasks.tfds import readers

_SPLITS = {"train": "train", "validation": "dev"}


class MsMarcoPassage(common.Builder):
  """MS MARCO passage ranking: 8.8M passages with train and dev queries and judgements."""

  name = "lmindexer_msmarco_passage"
  KINDS = (common.CORPUS, common.QUERIES)
  BUILDER_CONFIGS = [common.Config(name="default", description="The full passage collection.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://microsoft.github.io/msmarco/ (passage ranking) unpack collection.tar.gz and
  queries.tar.gz, and put collection.tsv, queries.train.tsv, qrels.train.tsv and optionally
  queries.dev.tsv, qrels.dev.tsv directly in manual_dir.
  """
  HOMEPAGE = "https://microsoft.github.io/msmarco/"
  CITATION = """@inproceedings{nguyen2016msmarco,
  title={MS MARCO: A Human Generated MAchine Reading COmprehension Dataset},
  author={Nguyen, Tri and others},
  booktitle={CoCo@NIPS},
  year={2016}}"""

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    corpus = readers.tsv_corpus(
      root, "collection.tsv", id_field="pid", text_field="passage",
      empty_documents=self.empty_documents,
    )
    splits = {common.CORPUS: self._corpus_examples(corpus)}
    for split, stem in _SPLITS.items():
      has_queries = any((root / f"queries.{stem}.tsv{gz}").exists() for gz in ("", ".gz"))
      if split == "validation" and not has_queries:
        continue
      queries_path = readers.require_file(root, f"queries.{stem}.tsv")
      queries = readers.read_tsv_queries(queries_path, self.empty_documents)
      qrels_path = readers.require_file(root, f"qrels.{stem}.tsv")
      relevant = readers.read_qrels(qrels_path, queries, corpus)
      readers.log_dropped(
        queries_path, len(queries.text) - len(relevant), "queries without a relevant passage"
      )
      self._add_query_split(splits, split, readers.query_rows(queries, relevant), queries_path)
    return splits
