"""IDs for new documents from a finished indexer run: manifest, codes, disambiguation, errors."""

import dataclasses
import json
import os
import subprocess
import sys

import indexer_test  # The tiny corpus, T5 and schedule of the pipeline tests (tests/ is on path).
import numpy as np
import pytest
import seqio
import xla_env

from lmindexer_jax import assign
from lmindexer_jax import index_pipeline
from lmindexer_jax import indexer_manifest
from tasks import semantic_ids
from tasks import settings
from tasks import synthetic

TASK = "lmindexer.synthetic.index"
MAX_LENGTH = 24
@dataclasses.dataclass(frozen=True)
class Run:
  model_dir: str
  corpus: index_pipeline.Corpus
  texts: tuple[str, ...]
  spm_file: str


@pytest.fixture(scope="module")
def run(straight_index) -> Run:
  """The pipeline tests' tiny run (`gin/runs/index.gin`, codebooks (2, 2)), shared with them."""
  model_dir = straight_index
  with settings.configured(indexer_test._TINY):
    vocabulary = seqio.get_mixture_or_task(TASK).output_features["inputs"].vocabulary
    corpus = index_pipeline.load_corpus(TASK, MAX_LENGTH)
    source = synthetic.corpus_source()
    assert tuple(source.doc_ids) == corpus.doc_ids
    spm_file = vocabulary.resolve().sentencepiece_model_file
    return Run(str(model_dir), corpus, tuple(source.texts), spm_file)


def _existing(run: Run) -> semantic_ids.SemanticIds:
  return semantic_ids.read(os.path.join(run.model_dir, semantic_ids.FILE_NAME), run.corpus.doc_ids)


def _groups(ids: semantic_ids.SemanticIds) -> tuple[np.ndarray, np.ndarray]:
  """(group_N, sizes_G): each document's group of equal codes before disambiguation, and the
  groups' sizes."""
  _, group_N, sizes_G = np.unique(ids.codes[:, :-1], axis=0, return_inverse=True,
                                  return_counts=True)
  return group_N.ravel(), sizes_G


def test_manifest_records_the_run(run):
  m = indexer_manifest.read_indexer_manifest(run.model_dir)
  assert m.index_task == TASK and m.max_length == MAX_LENGTH
  assert m.config.codebook_sizes == (2, 2)
  assert m.t5_config.emb_dim == 32 and m.t5_config.vocab_size == m.base_vocab_size + 4
  assert m.position_stages == ("quantized_0", "quantized_1") and m.final_stage == "quantized_1"
  assert m.base_vocab_size == run.corpus.base_vocab_size
  assert m.eval_batch_size == 32
  with open(m.vocabulary_path, "rb") as a, open(run.spm_file, "rb") as b:
    assert a.read() == b.read()


def test_missing_manifest_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="indexer_manifest.json: no indexer manifest"):
    indexer_manifest.read_indexer_manifest(str(tmp_path))


def test_new_documents_tokenize_like_the_index_task(run):
  m = indexer_manifest.read_indexer_manifest(run.model_dir)
  tokens = assign.tokenize(run.texts, m.vocabulary(), m.max_length)
  np.testing.assert_array_equal(tokens, run.corpus.tokens_NxL)


def test_corpus_documents_as_new_get_back_their_codes(run, tmp_path):
  existing = _existing(run)
  assert len(np.unique(existing.codes[:, 0])) > 1  # Not a collapsed (vacuous) run.
  path = tmp_path / "new.tsv"
  path.write_text("".join(f"new-{d}\t{t}\n"
                          for d, t in zip(run.corpus.doc_ids, run.texts, strict=True)))
  # Every group doubles, outgrowing the disambiguation size (an error without `grow`, below).
  ids = assign.assign_file(run.model_dir, str(path), str(tmp_path / "out.tsv"),
                           grow_disambiguation=True)
  written = semantic_ids.read(str(tmp_path / "out.tsv"))
  assert written.doc_ids == tuple(f"new-{d}" for d in run.corpus.doc_ids)
  np.testing.assert_array_equal(written.codes, ids.codes)
  np.testing.assert_array_equal(written.codes[:, :-1], existing.codes[:, :-1])
  # New codes follow each group's existing ones: the group's size, then up, in input order.
  group_N, sizes_G = _groups(existing)
  expected = sizes_G[group_N] + existing.codes[:, -1]
  np.testing.assert_array_equal(written.codes[:, -1], expected)
  assert written.disambiguation_size == int(expected.max()) + 1
  both = np.concatenate([existing.codes, written.codes])
  assert len(np.unique(both, axis=0)) == len(both)


def test_disambiguation_continues_each_group():
  existing = semantic_ids.SemanticIds(
      ("a", "b", "c", "d"), np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 3]], np.int32),
      codebook_sizes=(2, 2), disambiguation_size=5)
  codes, size = assign.disambiguate(
      existing, ["e", "f", "g", "h"], np.array([[0, 0], [0, 1], [0, 0], [1, 1]]))
  # (0,0) has 0,1 -> 2 then 3; (0,1) has 3 (1 and 2 are free, but may be deleted docs') -> 4.
  np.testing.assert_array_equal(codes, [[0, 0, 2], [0, 1, 4], [0, 0, 3], [1, 1, 0]])
  assert size == 5
  with pytest.raises(assign.DisambiguationOverflowError,
                     match=r"'y' has semantic codes \(0, 1\), whose group would need "
                           r"disambiguation code 5, but the ID file's disambiguation_size is 5"):
    assign.disambiguate(existing, ["x", "y"], np.array([[0, 1], [0, 1]]))
  codes, size = assign.disambiguate(existing, ["x", "y"], np.array([[0, 1], [0, 1]]), grow=True)
  np.testing.assert_array_equal(codes[:, -1], [4, 5])
  assert size == 6


@pytest.mark.parametrize("name, content, line, field", [
    ("docs.tsv", "n1\tsome text\nn2 no tab\n", 2, "line"),
    ("docs.tsv", "# comment\n\n\tsome text\n", 3, "doc_id"),
    ("docs.tsv", "n1\tsome text\nn2\t  \n", 2, "text"),
    ("docs.tsv", "n1\tsome text\nn1\tother text\n", 2, "doc_id"),
    ("docs.tsv", b"n1\tok\nn2\t\xff\n", 2, "line"),
    ("docs.jsonl", '{"doc_id": "n1", "text": "a"}\n{"doc_id": "n2", "text": \n', 2, "json"),
    ("docs.jsonl", '{"doc_id": "n1"}\n', 1, "text"),
    ("docs.jsonl", '\n{"doc_id": 7, "text": "a"}\n', 2, "doc_id"),
    ("docs.jsonl", '["n1", "a"]\n', 1, "json"),
])
def test_bad_input_names_file_line_and_field(tmp_path, name, content, line, field):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(assign.DocumentFileError, match=rf"^{path}:{line}: {field}: ") as e:
    assign.read_documents(str(path))
  assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)


def test_known_doc_id_is_an_error_before_any_encoding(run, tmp_path):
  known = run.corpus.doc_ids[5]
  path = tmp_path / "docs.jsonl"
  path.write_text(json.dumps({"doc_id": "fresh", "text": "a b"}) + "\n"
                  + json.dumps({"doc_id": known, "text": "c d"}) + "\n")
  with pytest.raises(assign.DocumentFileError,
                     match=rf"^{path}:2: doc_id: '{known}' already has an ID in "):
    assign.assign_file(run.model_dir, str(path), str(tmp_path / "out.tsv"))


def test_command_line(run, tmp_path):
  """Documents of a group with room get its next codes, in the existing disambiguation size."""
  existing = _existing(run)
  group_N, sizes_G = _groups(existing)
  # Two members of a group that has room for two more.
  eligible = np.flatnonzero((sizes_G >= 2) & (sizes_G + 2 <= existing.disambiguation_size))
  assert eligible.size, "no group of two or more with room for two"
  smallest = int(eligible[np.argmin(sizes_G[eligible])])
  rows = np.flatnonzero(group_N == smallest)[:2]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"doc_id": f"x{i}", "text": run.texts[i]}) + "\n"
                          for i in rows))
  command = [sys.executable, "-m", "lmindexer_jax.assign", f"--model_dir={run.model_dir}",
             f"--input={path}", f"--output={tmp_path / 'out.tsv'}"]
  env = xla_env.env()
  result = subprocess.run(command, cwd=indexer_test.REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  written = semantic_ids.read(str(tmp_path / "out.tsv"))
  assert written.disambiguation_size == existing.disambiguation_size
  np.testing.assert_array_equal(written.codes[:, :-1], existing.codes[rows, :-1])
  np.testing.assert_array_equal(written.codes[:, -1], sizes_G[smallest] + np.arange(2))

