"""The ID file: written by an indexer (any ID scheme), read by every task that needs IDs.

`semantic_ids.tsv` is UTF-8 text, one document per line:

  # codebook_sizes: 8 8 8
  # disambiguation_size: 5
  d0<TAB>3 1 7 0
  d1<TAB>3 1 7 1

A line is the doc id, one TAB, and the document's codes: non-negative integers separated by
single spaces, one per ID position, the same number on every line. Lines starting with `#` are
comments; the two optional header comments above fix the vocabulary layout (learned codebook
sizes, and the size of a final disambiguation position). Blank lines are ignored.

Sizes are taken, in order of precedence, from the `IdFile` config, the header, or the codes
themselves (max code + 1 per position, all positions learned). Prefer writing the header: the
model's vocabulary must have a token for every code of a codebook even if no document uses it.
"""

from collections.abc import Sequence
import dataclasses

from absl import logging
import numpy as np

from lmindexer_jax import files
from lmindexer_jax import vocabularies
from tasks import settings

FILE_NAME = "semantic_ids.tsv"
_CODEBOOK_HEADER = "codebook_sizes"
_DISAMBIGUATION_HEADER = "disambiguation_size"


class IdFileError(ValueError):
  """A bad ID file; the message starts with `path:line: field:`."""

  def __init__(self, path: str, line: int | None, field: str, message: str):
    self.path, self.line, self.field = path, line, field
    where = f"{path}:{line}" if line is not None else path
    super().__init__(f"{where}: {field}: {message}")


@settings.config_class
@dataclasses.dataclass(frozen=True)
class IdFile:
  """Which ID file the ID tasks read (bind `tasks.semantic_ids.IdFile.path = %ID_FILE`).

  Attributes:
    path: the ID file.
    codebook_sizes: sizes of the learned positions; overrides the file's header.
    disambiguation_size: size of the disambiguation position; overrides the file's header.
  """

  path: str = ""
  codebook_sizes: tuple[int, ...] | None = None
  disambiguation_size: int | None = None

  def __post_init__(self):
    if self.codebook_sizes is not None:
      object.__setattr__(self, "codebook_sizes", tuple(int(k) for k in self.codebook_sizes))


@dataclasses.dataclass(frozen=True, eq=False)
class SemanticIds:
  """Codes of every document, in corpus order.

  Attributes:
    doc_ids: [N] document ids.
    codes: int32 [N, num_positions].
    codebook_sizes: sizes of the learned positions.
    disambiguation_size: size of the last (disambiguation) position; 0 if there is none.
  """

  doc_ids: tuple[str, ...]
  codes: np.ndarray
  codebook_sizes: tuple[int, ...]
  disambiguation_size: int = 0

  @property
  def position_sizes(self) -> tuple[int, ...]:
    extra = (self.disambiguation_size,) if self.disambiguation_size else ()
    return self.codebook_sizes + extra

  def id_strings(self) -> list[str]:
    """`<id_0_a><id_1_b>...` per document."""
    return [vocabularies.id_string(row) for row in self.codes.tolist()]

  def num_collisions(self) -> int:
    """Documents whose full ID equals an earlier document's."""
    return len(self.codes) - len(np.unique(self.codes, axis=0))


def append_disambiguation(codes_NxC: np.ndarray) -> tuple[np.ndarray, int]:
  """Appends a collision counter: the number of earlier rows with the same codes.

  This is the reference's final ID position (`add_final_id`), sized here by the largest group.

  Returns:
    int32 [N, C + 1] codes and the disambiguation size (largest counter + 1).
  """
  codes_NxC = np.asarray(codes_NxC, np.int64)
  counts: dict[tuple[int, ...], int] = {}
  counter_N = np.zeros(len(codes_NxC), np.int64)
  for i, row in enumerate(map(tuple, codes_NxC.tolist())):
    counter_N[i] = counts.get(row, 0)
    counts[row] = counter_N[i] + 1
  size = int(counter_N.max()) + 1 if len(counter_N) else 1
  return np.concatenate([codes_NxC, counter_N[:, None]], axis=1).astype(np.int32), size


def write(
    path: str,
    doc_ids: Sequence[str],
    codes: np.ndarray,
    *,
    codebook_sizes: Sequence[int] | None = None,
    disambiguation_size: int = 0,
) -> str:
  """Writes an ID file atomically (with the size header if `codebook_sizes` is given).

  Args:
    path: the file to write; its directory is created.
    doc_ids: [N] document ids, in corpus order.
    codes: int [N, num_positions] codes.
    codebook_sizes: sizes of the learned positions (recommended).
    disambiguation_size: size of the last position if it is a disambiguation counter.

  Returns:
    `path`.
  """
  codes = np.asarray(codes)
  if codes.ndim != 2 or len(codes) != len(doc_ids):
    raise ValueError(f"codes must be [{len(doc_ids)}, num_positions], got {codes.shape}")
  if not np.issubdtype(codes.dtype, np.integer) or (codes < 0).any():
    raise ValueError("codes must be non-negative integers")
  if len(set(doc_ids)) != len(doc_ids):
    raise ValueError("doc_ids must be unique")
  for doc_id in doc_ids:
    if not doc_id or any(c in doc_id for c in "\t\n\r") or doc_id.startswith("#"):
      raise ValueError(f"doc id {doc_id!r} is empty, starts with '#' or has a TAB/newline")
  lines = []
  if codebook_sizes is not None:
    sizes = (*codebook_sizes, disambiguation_size) if disambiguation_size else tuple(codebook_sizes)
    if len(sizes) != codes.shape[1]:
      raise ValueError(f"{codes.shape[1]} codes per document but sizes {sizes}")
    over = codes >= np.asarray(sizes)
    if over.any():
      row, pos = map(int, np.argwhere(over)[0])
      raise ValueError(f"{doc_ids[row]}: code {codes[row, pos]} >= size {sizes[pos]} at {pos}")
    lines.append(f"# {_CODEBOOK_HEADER}: {' '.join(map(str, codebook_sizes))}\n")
    lines.append(f"# {_DISAMBIGUATION_HEADER}: {disambiguation_size}\n")
  lines.extend(
      f"{doc_id}\t{' '.join(map(str, row))}\n"
      for doc_id, row in zip(doc_ids, codes.tolist(), strict=True)
  )
  return files.write_text(path, "".join(lines))


def _parse_sizes(path: str, line: int, field: str, text: str) -> tuple[int, ...]:
  try:
    sizes = tuple(int(x) for x in text.split())
  except ValueError:
    raise IdFileError(path, line, field, f"expected integers, got {text!r}") from None
  if any(k < 0 for k in sizes):
    raise IdFileError(path, line, field, f"sizes must be non-negative: {sizes}")
  return sizes


def read(
    path: str,
    doc_ids: Sequence[str] | None = None,
    *,
    codebook_sizes: Sequence[int] | None = None,
    disambiguation_size: int | None = None,
) -> SemanticIds:
  """Reads and validates an ID file.

  Args:
    path: the ID file.
    doc_ids: the corpus's doc ids: every one must have exactly one line and no other doc id
      may appear; the result follows this order. None: file order, no corpus checks.
    codebook_sizes: overrides the header's learned sizes.
    disambiguation_size: overrides the header's disambiguation size.

  Raises:
    IdFileError: naming the file, the line and the field.
  """
  header: dict[str, tuple[int, ...]] = {}
  ids: list[str] = []
  rows: list[list[int]] = []
  line_of: dict[str, int] = {}
  num_codes = None
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise IdFileError(path, None, "file", f"cannot open the ID file ({e.strerror})") from None
  with f:
    for number, raw in enumerate(f, start=1):
      line = raw.rstrip("\n").rstrip("\r")
      if not line.strip():
        continue
      if line.startswith("#"):
        key, sep, value = line[1:].partition(":")
        key = key.strip()
        if sep and key in (_CODEBOOK_HEADER, _DISAMBIGUATION_HEADER):
          header[key] = _parse_sizes(path, number, key, value)
          if key == _DISAMBIGUATION_HEADER and len(header[key]) != 1:
            raise IdFileError(path, number, key, f"expected one integer, got {value.strip()!r}")
        continue
      doc_id, sep, code_text = line.partition("\t")
      if not sep or "\t" in code_text:
        raise IdFileError(path, number, "line", f"expected 'doc_id<TAB>codes', got {line!r}")
      if not doc_id.strip():
        raise IdFileError(path, number, "doc_id", "empty doc id")
      if doc_id in line_of:
        raise IdFileError(path, number, "doc_id", f"{doc_id!r} repeats line {line_of[doc_id]}")
      parts = code_text.split(" ")
      row = []
      for i, part in enumerate(parts):
        if not (part.isascii() and part.isdigit()):
          raise IdFileError(path, number, f"codes[{i}]", f"not a non-negative integer: {part!r}")
        row.append(int(part))
      if num_codes is None:
        num_codes, first_line = len(row), number
      elif len(row) != num_codes:
        raise IdFileError(
            path, number, "codes", f"{len(row)} codes, but line {first_line} has {num_codes}"
        )
      line_of[doc_id] = number
      ids.append(doc_id)
      rows.append(row)
  if not rows:
    raise IdFileError(path, None, "file", "no IDs in the file")
  codes = np.asarray(rows, np.int64)

  # Sizes: arguments, then header, then max code + 1.
  if codebook_sizes is None and _CODEBOOK_HEADER in header:
    codebook_sizes = header[_CODEBOOK_HEADER]
  if disambiguation_size is None and _DISAMBIGUATION_HEADER in header:
    (disambiguation_size,) = header[_DISAMBIGUATION_HEADER]
  observed = codes.max(axis=0) + 1
  if codebook_sizes is None:
    learned = num_codes - (1 if disambiguation_size else 0)
    codebook_sizes = tuple(int(k) for k in observed[:learned])
  codebook_sizes = tuple(int(k) for k in codebook_sizes)
  if num_codes == len(codebook_sizes) + 1:
    if not disambiguation_size:
      disambiguation_size = int(observed[-1])
  elif num_codes == len(codebook_sizes):
    if disambiguation_size:
      raise IdFileError(
          path, first_line, "codes",
          f"{num_codes} codes per line leave no room for the disambiguation position "
          f"(codebook_sizes {codebook_sizes}, disambiguation_size {disambiguation_size})",
      )
    disambiguation_size = 0
  else:
    raise IdFileError(
        path, first_line, "codes",
        f"{num_codes} codes per line, but codebook_sizes {codebook_sizes} expect "
        f"{len(codebook_sizes)} (+1 disambiguation)",
    )
  sizes = np.asarray(codebook_sizes + ((disambiguation_size,) if disambiguation_size else ()))
  over = codes >= sizes
  if over.any():
    row, pos = map(int, np.argwhere(over)[0])
    raise IdFileError(
        path, line_of[ids[row]], f"codes[{pos}]", f"code {codes[row, pos]} >= size {sizes[pos]}"
    )

  if doc_ids is not None:
    row_of = {doc_id: i for i, doc_id in enumerate(ids)}
    corpus_ids = set(doc_ids)
    for doc_id in ids:
      if doc_id not in corpus_ids:
        raise IdFileError(path, line_of[doc_id], "doc_id", f"unknown doc id {doc_id!r}")
    missing = [doc_id for doc_id in doc_ids if doc_id not in row_of]
    if missing:
      raise IdFileError(
          path, None, "doc_id",
          f"{len(missing)} of {len(doc_ids)} corpus documents have no ID (e.g. {missing[:3]})",
      )
    codes = codes[[row_of[doc_id] for doc_id in doc_ids]]
    ids = list(doc_ids)
  result = SemanticIds(tuple(ids), codes.astype(np.int32), codebook_sizes, disambiguation_size)
  collisions = result.num_collisions()
  if collisions:
    logging.warning("%s: %d documents share their full ID with another.", path, collisions)
  return result


def check_configured(id_file: IdFile) -> None:
  """Raises if no path is set, saying how to set one."""
  if not id_file.path:
    raise ValueError(
        "No ID file configured: bind tasks.semantic_ids.IdFile.path (gin) or pass "
        "tasks.semantic_ids.IdFile(path=...) to tasks.settings.configure."
    )


def load(id_file: IdFile, doc_ids: Sequence[str]) -> SemanticIds:
  """`read` with the path and size overrides of an `IdFile` config."""
  check_configured(id_file)
  return read(
      id_file.path,
      doc_ids,
      codebook_sizes=id_file.codebook_sizes,
      disambiguation_size=id_file.disambiguation_size,
  )
