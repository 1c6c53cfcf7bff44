"""The ID file: round trips, sizes, and bad input named by file, line and field."""

import os

import numpy as np
import pytest

from tasks import semantic_ids

DOCS = ("d0", "d1", "d2", "d3")
CODES = np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0], [1, 3, 0]])


def _write_text(tmp_path, text: str) -> str:
  path = tmp_path / semantic_ids.FILE_NAME
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_round_trip_with_header(tmp_path):
  path = semantic_ids.write(
      str(tmp_path / "run" / semantic_ids.FILE_NAME), DOCS, CODES,
      codebook_sizes=(4, 8), disambiguation_size=2,
  )
  ids = semantic_ids.read(path, DOCS)
  assert ids.doc_ids == DOCS
  np.testing.assert_array_equal(ids.codes, CODES)
  assert ids.codebook_sizes == (4, 8) and ids.disambiguation_size == 2
  assert ids.position_sizes == (4, 8, 2)
  assert ids.id_strings()[1] == "<id_0_0><id_1_1><id_2_1>"
  assert os.listdir(tmp_path / "run") == [semantic_ids.FILE_NAME]  # No temp file left.


def test_result_follows_corpus_order(tmp_path):
  path = semantic_ids.write(str(tmp_path / "ids.tsv"), DOCS[::-1], CODES[::-1])
  ids = semantic_ids.read(path, DOCS)
  np.testing.assert_array_equal(ids.codes, CODES)
  assert semantic_ids.read(path).doc_ids == DOCS[::-1]  # No corpus: file order.


def test_sizes_without_header_are_max_plus_one(tmp_path):
  path = semantic_ids.write(str(tmp_path / "ids.tsv"), DOCS, CODES)
  ids = semantic_ids.read(path)
  assert ids.codebook_sizes == (3, 4, 2) and ids.disambiguation_size == 0
  # Config overrides: two learned positions, the third is the disambiguation position.
  ids = semantic_ids.read(path, codebook_sizes=(16, 16))
  assert ids.codebook_sizes == (16, 16) and ids.disambiguation_size == 2
  ids = semantic_ids.load(semantic_ids.IdFile(path, (16, 16), 5), DOCS)
  assert ids.position_sizes == (16, 16, 5)


def test_append_disambiguation_counts_earlier_collisions():
  codes, size = semantic_ids.append_disambiguation(np.array([[1, 2], [1, 2], [0, 0], [1, 2]]))
  np.testing.assert_array_equal(codes[:, -1], [0, 1, 0, 2])
  assert size == 3


def test_comments_and_blank_lines_are_skipped(tmp_path):
  path = _write_text(tmp_path, "# written by hand\n\nd0\t1 2\nd1\t0 0\n\n")
  assert semantic_ids.read(path).codes.tolist() == [[1, 2], [0, 0]]


@pytest.mark.parametrize(
    "text,line,field,match",
    [
        ("d0\t1 2\nd1 1 2\n", 2, "line", "doc_id<TAB>codes"),
        ("d0\t1 2\nd1\t1 x\n", 2, "codes[1]", "not a non-negative integer"),
        ("d0\t1 2\nd1\t1 -2\n", 2, "codes[1]", "not a non-negative integer"),
        ("d0\t1 2\nd1\t1  2\n", 2, "codes[1]", "''"),
        ("d0\t1 2\nd1\t1 2 3\n", 2, "codes", "3 codes, but line 1 has 2"),
        ("d0\t1 2\n\nd0\t1 3\n", 3, "doc_id", "repeats line 1"),
        ("\t1 2\n", 1, "doc_id", "empty"),
        ("# codebook_sizes: 4 x\nd0\t1 2\n", 1, "codebook_sizes", "integers"),
        ("# disambiguation_size: 3 4\nd0\t1 2 0\n", 1, "disambiguation_size", "one integer"),
        ("# codebook_sizes: 4 2\nd0\t1 2\n", 2, "codes[1]", "code 2 >= size 2"),
        ("# codebook_sizes: 4 4 4 4\nd0\t1 2\n", 2, "codes", "expect 4"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, text, line, field, match):
  path = _write_text(tmp_path, text)
  with pytest.raises(semantic_ids.IdFileError, match=match) as e:
    semantic_ids.read(path)
  assert (e.value.path, e.value.line, e.value.field) == (path, line, field)
  assert str(e.value).startswith(f"{path}:{line}: {field}: ")


def test_corpus_checks(tmp_path):
  path = _write_text(tmp_path, "d0\t1 2\nd9\t0 0\nd1\t0 1\n")
  with pytest.raises(semantic_ids.IdFileError, match=r":2: doc_id: unknown doc id 'd9'"):
    semantic_ids.read(path, ("d0", "d1", "d9x"))
  with pytest.raises(semantic_ids.IdFileError, match=r"doc_id: 1 of 4 corpus documents have no ID"):
    semantic_ids.read(path, ("d0", "d1", "d9", "d2"))


def test_missing_or_unconfigured_file(tmp_path):
  with pytest.raises(semantic_ids.IdFileError, match="file: cannot open"):
    semantic_ids.read(str(tmp_path / "nope.tsv"))
  with pytest.raises(semantic_ids.IdFileError, match="no IDs"):
    semantic_ids.read(_write_text(tmp_path, "# only a comment\n"))
  with pytest.raises(ValueError, match="IdFile.path"):
    semantic_ids.load(semantic_ids.IdFile(), DOCS)


def test_write_validates(tmp_path):
  path = str(tmp_path / "ids.tsv")
  with pytest.raises(ValueError, match="size 2 at 1"):
    semantic_ids.write(path, DOCS, CODES, codebook_sizes=(4, 2, 2))
  with pytest.raises(ValueError, match="TAB"):
    semantic_ids.write(path, ("a\tb",), CODES[:1])
  with pytest.raises(ValueError, match="unique"):
    semantic_ids.write(path, ("a", "a"), CODES[:2])
  assert not os.path.exists(path)
