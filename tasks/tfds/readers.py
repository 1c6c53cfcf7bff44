"""Parsing and validation of raw data files, shared by every builder in `tasks.tfds`.

Plain Python, no TensorFlow. Readers stream a file and yield `(line, record)` with 1-based line
numbers. The first bad record raises `DataError`, whose message starts
`<file>:<line>: field '<field>':`. Records dropped on purpose are always counted in an absl log
line, never dropped silently. These are empty documents or queries under
`empty_documents='skip'`, references to them, and queries without a relevant document.

Text rules:
  * Files are UTF-8 (a BOM is allowed), optionally gzipped (`*.gz`). Blank lines are not records.
  * Invalid UTF-8, or a JSON `\\ud800`-style lone surrogate, is an error that names its field.
  * Ids may be JSON strings or integers. Both become `str`, and an empty id is an error.
  * A document's `text` is its body, with its title (if any) in front: `join_title`.
  * A category path `a/b/c` becomes the labels `('a', 'b', 'c')`. Empty levels are dropped.
"""

from __future__ import annotations

import ast
import codecs
import collections
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import dataclasses
import gzip
import json
import os
from typing import Any

from absl import logging
from etils import epath

EMPTY_POLICIES = ("skip", "error")


class DataError(ValueError):
  """A bad record in a raw data file.

  Attributes:
    path: the file, as a string.
    line: 1-based line (1-based row for parquet and CSV records); None if the whole file is bad.
    field: the field or column at fault; None if the line cannot be parsed at all.
    reason: the message without the location.
  """

  def __init__(self, path: epath.PathLike, line: int | None, field: str | None, reason: str):
    self.path = os.fspath(path)
    self.line = line
    self.field = field
    self.reason = reason
    where = self.path if line is None else f"{self.path}:{line}"
    if field is not None:
      where += f": field '{field}'"
    # One positional arg and no __str__ override, so TFDS's `reraise` keeps the type.
    super().__init__(f"{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class Document:
  """One corpus document (or catalogue item)."""

  doc_id: str
  text: str
  title: str = ""
  labels: tuple[str, ...] = ()


def check_empty_policy(empty_documents: str) -> str:
  if empty_documents not in EMPTY_POLICIES:
    raise ValueError(f"empty_documents must be one of {EMPTY_POLICIES}, got {empty_documents!r}")
  return empty_documents


def join_title(title: str, body: str) -> str:
  """`title. body` (no extra period after end punctuation). Returns `body` if `title` is empty."""
  title, body = title.strip(), body.strip()
  if not title:
    return body
  if not body:
    return title
  return f"{title}{' ' if title[-1] in '.!?:;' else '. '}{body}"


def split_path(category: str | Sequence[str]) -> tuple[str, ...]:
  """`'Tops/Knits'` -> `('Tops', 'Knits')`; a list is taken as the levels already split."""
  levels = category.split("/") if isinstance(category, str) else category
  return tuple(level.strip() for level in levels if level.strip())


def log_dropped(path: epath.PathLike, count: int, what: str, examples: Iterable[str] = ()) -> None:
  """The one warning for every record that a reader leaves out on purpose."""
  if count:
    shown = ", ".join(repr(e) for e in list(examples)[:5])
    suffix = f" (e.g. {shown})" if shown else ""
    logging.warning("%s: %d %s%s", os.fspath(path), count, what, suffix)


# ---------------------------------------------------------------------------------------------
# Lines and fields.


@contextlib.contextmanager
def _open_binary(path: epath.PathLike):
  path = epath.Path(path)
  with path.open("rb") as f:
    if path.name.endswith(".gz"):
      with gzip.GzipFile(fileobj=f) as g:
        yield g
    else:
      yield f


def iter_raw_lines(path: epath.PathLike) -> Iterator[tuple[int, bytes]]:
  """Yields `(line, bytes)` without line endings; blank lines are skipped."""
  with _open_binary(path) as f:
    for n, raw in enumerate(f, start=1):
      raw = raw.rstrip(b"\r\n")
      if n == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
      if raw.strip():
        yield n, raw


def invalid_unicode(text: str) -> bool:
  """Whether `text` holds a lone surrogate (from bad UTF-8 bytes or a JSON `\\ud800` escape)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def _surrogate_field(obj: Any, prefix: str = "") -> str | None:
  """Path (`a.b[2]`) of the first string in `obj` that is not valid Unicode; None if all are."""
  if isinstance(obj, Mapping):
    children = [(f"{prefix}.{k}" if prefix else str(k), k, v) for k, v in obj.items()]
  elif isinstance(obj, list | tuple):
    children = [(f"{prefix}[{i}]", None, v) for i, v in enumerate(obj)]
  else:
    return None
  for name, key, value in children:
    if isinstance(key, str) and invalid_unicode(key):
      return name
    if isinstance(value, str) and invalid_unicode(value):
      return name
    if (found := _surrogate_field(value, name)) is not None:
      return found
  return None


def parse_line(
  raw: bytes, path: epath.PathLike, line: int, parse: Callable[[str], Any], what: str
) -> Any:
  """Decodes one line and parses it (`json.loads` or `ast.literal_eval`), or raises DataError."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    field = None
    try:  # Parse the bad bytes as lone surrogates, only to name the field that holds them.
      field = _surrogate_field(parse(raw.decode("utf-8", "surrogateescape")))
    except Exception:  # Best effort only: the error below is raised either way.
      pass
    raise DataError(path, line, field, f"invalid UTF-8 at byte {e.start} of the line") from None
  try:
    obj = parse(text)
  except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as e:
    raise DataError(path, line, None, f"invalid {what}: {e}") from None
  if (field := _surrogate_field(obj)) is not None:
    raise DataError(path, line, field, "invalid Unicode (lone surrogate)")
  return obj


def _iter_objects(path, parse, what) -> Iterator[tuple[int, dict[str, Any]]]:
  for line, raw in iter_raw_lines(path):
    obj = parse_line(raw, path, line, parse, what)
    if not isinstance(obj, dict):
      raise DataError(path, line, None, f"expected an object, got {type(obj).__name__}")
    yield line, obj


def iter_jsonl(path: epath.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(line, object)` for a JSON-lines file."""
  return _iter_objects(path, json.loads, "JSON")


def iter_python_literals(path: epath.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(line, dict)` for a file of Python dict literals (`ast.literal_eval`, never eval)."""
  return _iter_objects(path, ast.literal_eval, "Python literal")


def decode_field(raw: bytes, path: epath.PathLike, line: int, field: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(path, line, field, f"invalid UTF-8 at byte {e.start} of the field") from None


def iter_columns(
  path: epath.PathLike,
  names: Sequence[str],
  *,
  header: Sequence[str] = (),
  last_takes_rest: bool = False,
  first_takes_rest: bool = False,
) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields `(line, {name: value})` for a tab-separated file with columns `names`.

  Args:
    path: the file.
    names: the column names, also used in error messages. Extra columns are an error unless
      `last_takes_rest` (the last column keeps its tabs) or `first_takes_rest` (the first does).
    header: first-column values that mark the first line as a header, which is skipped.
  """
  first = True
  for line, raw in iter_raw_lines(path):
    if last_takes_rest:
      parts = raw.split(b"\t", len(names) - 1)
    elif first_takes_rest:
      parts = raw.rsplit(b"\t", len(names) - 1)
    else:
      parts = raw.split(b"\t")
    if first and header and parts[0].strip().decode("utf-8", "replace").lower() in header:
      first = False
      continue
    first = False
    if len(parts) < len(names):
      raise DataError(path, line, names[len(parts)], f"missing column (want {len(names)})")
    if len(parts) > len(names):
      raise DataError(path, line, None, f"{len(parts)} tab-separated columns, want {len(names)}")
    yield line, {n: decode_field(p, path, line, n) for n, p in zip(names, parts, strict=True)}


# ---------------------------------------------------------------------------------------------
# Fields of parsed records.


def get_str(
  record: Mapping[str, Any], field: str, path: epath.PathLike, line: int, required: bool = True
) -> str:
  """`record[field]` as a string; a missing or null optional field reads as ''."""
  if field not in record or (record[field] is None and not required):
    if required:
      raise DataError(path, line, field, "missing field")
    return ""
  value = record[field]
  if not isinstance(value, str):
    raise DataError(path, line, field, f"expected a string, got {type(value).__name__}")
  return value


def as_id(value: Any, path: epath.PathLike, line: int, field: str) -> str:
  """An id: a non-empty string, or an integer written as one."""
  if isinstance(value, bool) or not isinstance(value, str | int):
    raise DataError(path, line, field, f"expected a string id, got {type(value).__name__}")
  value = str(value)
  if not value.strip():
    raise DataError(path, line, field, "empty id")
  return value


def get_id(record: Mapping[str, Any], field: str, path: epath.PathLike, line: int) -> str:
  if field not in record:
    raise DataError(path, line, field, "missing field")
  return as_id(record[field], path, line, field)


# ---------------------------------------------------------------------------------------------
# Id registries: what later files may refer to.


class Ids:
  """Ids read from one file in order: the kept ones (id -> 0-based index) and the skipped ones.

  `add` enforces uniqueness and the empty-record policy; `resolve` is how every other file
  refers to these ids: an unknown id is a DataError, a skipped one is reported as not kept.
  """

  def __init__(self, path: epath.PathLike, what: str, empty_policy: str = "skip"):
    self.path = epath.Path(path)
    self.what = what
    self.empty_policy = check_empty_policy(empty_policy)
    self.index: dict[str, int] = {}
    self.skipped: dict[str, int] = {}  # id -> line

  def __len__(self) -> int:
    return len(self.index)

  def __contains__(self, id_: str) -> bool:
    return id_ in self.index

  def add(self, id_: str, empty: bool, line: int, id_field: str, text_field: str) -> bool:
    """Registers `id_`; returns whether it is kept (False: empty and skipped)."""
    if id_ in self.index or id_ in self.skipped:
      raise DataError(self.path, line, id_field, f"duplicate {self.what} id {id_!r}")
    if empty:
      if self.empty_policy == "error":
        raise DataError(self.path, line, text_field, f"empty {self.what} (id {id_!r})")
      self.skipped[id_] = line
      return False
    self.index[id_] = len(self.index)
    return True

  def resolve(self, id_: str, path: epath.PathLike, line: int, field: str) -> bool:
    """True if `id_` is kept, False if it was skipped as empty; DataError if it is unknown."""
    if id_ in self.index:
      return True
    if id_ in self.skipped:
      return False
    raise DataError(path, line, field, f"unknown {self.what} id {id_!r} (not in {self.path.name})")

  def log_skipped(self) -> None:
    log_dropped(
      self.path,
      len(self.skipped),
      f"empty {self.what}s skipped (empty_documents='skip')",
      self.skipped,
    )


DocumentReader = Callable[[], Iterator[tuple[int, Document]]]


class Corpus:
  """A validated document file: ids checked once up front, texts streamed on each iteration.

  Construction reads the file once: it checks fields and duplicate ids, and it skips or rejects
  empty documents. Iterating reads the file again and yields `(doc_index, Document)` for the
  kept documents, so a large corpus's texts never sit in memory together.
  """

  def __init__(
    self,
    path: epath.PathLike,
    read: DocumentReader,
    *,
    id_field: str,
    text_field: str,
    empty_documents: str = "skip",
  ):
    self._read = read
    self.ids = Ids(path, "document", empty_documents)
    for line, doc in read():
      self.ids.add(doc.doc_id, not doc.text.strip(), line, id_field, text_field)
    self.ids.log_skipped()
    if not self.ids.index:
      raise DataError(path, None, None, "no non-empty documents")
    self.labels: dict[str, tuple[str, ...]] = {}

  @property
  def path(self) -> epath.Path:
    return self.ids.path

  def __len__(self) -> int:
    return len(self.ids)

  def __iter__(self) -> Iterator[tuple[int, Document]]:
    for _, doc in self._read():
      if doc.doc_id in self.ids.index:
        labels = self.labels.get(doc.doc_id, doc.labels)
        yield self.ids.index[doc.doc_id], dataclasses.replace(doc, labels=labels)


# ---------------------------------------------------------------------------------------------
# Layouts.


def read_jsonl_documents(
  path: epath.PathLike,
  *,
  id_field: str = "_id",
  text_field: str = "text",
  title_field: str | None = "title",
  category_field: str | None = None,
) -> Iterator[tuple[int, Document]]:
  """BEIR `corpus.jsonl` (`_id`, `text`, optional `title`) or `items.jsonl` (with `category`)."""
  for line, rec in iter_jsonl(path):
    doc_id = get_id(rec, id_field, path, line)
    body = get_str(rec, text_field, path, line)
    title = get_str(rec, title_field, path, line, required=False) if title_field else ""
    labels = ()
    if category_field and rec.get(category_field) is not None:
      category = rec[category_field]
      ok = isinstance(category, str) or (
        isinstance(category, list) and all(isinstance(c, str) for c in category)
      )
      if not ok:
        raise DataError(path, line, category_field, "expected a string or a list of strings")
      labels = split_path(category)
    yield line, Document(doc_id, join_title(title, body), title.strip(), labels)


def read_tsv_documents(
  path: epath.PathLike, *, id_field: str = "docid", text_field: str = "text"
) -> Iterator[tuple[int, Document]]:
  """`id<TAB>text` lines (NQ320k `corpus.tsv`, MS MARCO `collection.tsv`); text keeps its tabs.

  A first line that reads like a header (`docid`, `doc_id`, `id`, `pid`) is skipped.
  """
  header = ("docid", "doc_id", "id", "pid", "_id", id_field.lower())
  for line, cols in iter_columns(path, (id_field, text_field), header=header, last_takes_rest=True):
    yield line, Document(as_id(cols[id_field], path, line, id_field), cols[text_field].strip())


def read_labels(path: epath.PathLike, corpus: Corpus) -> dict[str, tuple[str, ...]]:
  """`labels.tsv`: `doc_id<TAB>category path`, optional header, extra columns ignored.

  With a header, the path comes from its `category` column. Documents without a line get no
  labels. A line for an unknown document, or a second line for one, is a DataError.
  """
  labels: dict[str, tuple[str, ...]] = {}
  lines: dict[str, int] = {}
  column, skipped = 1, []
  for n, (line, raw) in enumerate(iter_raw_lines(path)):
    parts = raw.split(b"\t")
    if n == 0 and parts[0].strip() == b"doc_id":
      names = [p.strip() for p in parts]
      column = names.index(b"category") if b"category" in names else 1
      continue
    doc_id = as_id(decode_field(parts[0], path, line, "doc_id"), path, line, "doc_id")
    if len(parts) <= column:
      raise DataError(path, line, "category", "missing column")
    category = decode_field(parts[column], path, line, "category")
    if doc_id in lines:
      raise DataError(
        path, line, "doc_id", f"second label line for {doc_id!r} (first: line {lines[doc_id]})"
      )
    lines[doc_id] = line
    if corpus.ids.resolve(doc_id, path, line, "doc_id"):
      labels[doc_id] = split_path(category)
    else:
      skipped.append(doc_id)
  log_dropped(path, len(skipped), "label lines for skipped empty documents left out", skipped)
  unlabelled = len(corpus) - len(labels)
  if unlabelled:
    logging.info("%s: %d of %d documents have no label line", path, unlabelled, len(corpus))
  return labels


@dataclasses.dataclass
class Queries:
  """Query texts by id (kept ones only) plus the `Ids` registry that validates references."""

  ids: Ids
  text: dict[str, str]


def _queries_from(path, rows: Iterable[tuple[int, str, str]], id_field, text_field, policy):
  queries = Queries(Ids(path, "query", policy), {})
  for line, qid, text in rows:
    if queries.ids.add(qid, not text.strip(), line, id_field, text_field):
      queries.text[qid] = text.strip()
  queries.ids.log_skipped()
  return queries


def read_jsonl_queries(path: epath.PathLike, empty_documents: str = "skip") -> Queries:
  """BEIR `queries.jsonl`: `_id`, `text`."""
  rows = (
    (line, get_id(rec, "_id", path, line), get_str(rec, "text", path, line))
    for line, rec in iter_jsonl(path)
  )
  return _queries_from(path, rows, "_id", "text", empty_documents)


def read_tsv_queries(path: epath.PathLike, empty_documents: str = "skip") -> Queries:
  """MS MARCO `queries.*.tsv`: `qid<TAB>query`."""
  rows = (
    (line, as_id(cols["qid"], path, line, "qid"), cols["query"])
    for line, cols in iter_columns(path, ("qid", "query"), header=("qid",), last_takes_rest=True)
  )
  return _queries_from(path, rows, "qid", "query", empty_documents)


_QREL_HEADERS = (b"query-id", b"query_id", b"qid", b"queryid")
_QREL_COLUMNS = {
  2: ("query-id", "corpus-id"),
  3: ("query-id", "corpus-id", "score"),
  4: ("query-id", "iteration", "corpus-id", "score"),
}


def read_qrels(path: epath.PathLike, queries: Queries, corpus: Corpus) -> dict[str, list[str]]:
  """Relevant doc ids per query id, in file order.

  Each line is whitespace-separated: `qid docid`, BEIR `qid docid score` (header allowed) or
  TREC `qid iteration docid score`. A score <= 0 is a judged non-relevant pair and is left out
  (counted). An unknown query or document is a DataError.
  """
  relevant: dict[str, list[str]] = {}
  seen: set[tuple[str, str]] = set()
  dropped = collections.Counter()
  for n, (line, raw) in enumerate(iter_raw_lines(path)):
    parts = raw.split()
    if n == 0 and parts[0].lower() in _QREL_HEADERS:
      continue
    if len(parts) not in _QREL_COLUMNS:
      raise DataError(path, line, None, f"{len(parts)} columns; want 2, 3 (BEIR) or 4 (TREC)")
    cols = dict(zip(_QREL_COLUMNS[len(parts)], parts, strict=True))
    qid, doc_id = (
      as_id(decode_field(cols[f], path, line, f), path, line, f) for f in ("query-id", "corpus-id")
    )
    score = 1.0
    if "score" in cols:
      try:
        score = float(cols["score"])
      except ValueError:
        raise DataError(path, line, "score", f"not a number: {cols['score']!r}") from None
    query_kept = queries.ids.resolve(qid, path, line, "query-id")
    doc_kept = corpus.ids.resolve(doc_id, path, line, "corpus-id")
    if score <= 0:
      dropped["judgements with score <= 0 (not relevant) left out"] += 1
    elif not query_kept:
      dropped["judgements of skipped empty queries left out"] += 1
    elif not doc_kept:
      dropped["judgements naming skipped empty documents left out"] += 1
    elif (qid, doc_id) in seen:
      dropped["duplicate judgements left out"] += 1
    else:
      seen.add((qid, doc_id))
      relevant.setdefault(qid, []).append(doc_id)
  for what, count in sorted(dropped.items()):
    log_dropped(path, count, what)
  return relevant


def read_sequences(
  path: epath.PathLike, items: Corpus, *, user_field: str = "user_id", items_field: str = "items"
) -> list[tuple[str, list[str]]]:
  """`sequences.jsonl`: `user_id` and `items` (item ids, oldest first), one user per line.

  An unknown item or a repeated user is a DataError. Items skipped as empty documents are left
  out of the histories, and a history left empty is left out; both are counted.
  """
  users = Ids(path, "user")
  sequences, dropped_items, dropped_users = [], 0, []
  for line, rec in iter_jsonl(path):
    user = get_id(rec, user_field, path, line)
    if items_field not in rec:
      raise DataError(path, line, items_field, "missing field")
    if not isinstance(rec[items_field], list):
      raise DataError(path, line, items_field, f"expected a list, got {type(rec[items_field])}")
    history = []
    for i, value in enumerate(rec[items_field]):
      item = as_id(value, path, line, f"{items_field}[{i}]")
      if items.ids.resolve(item, path, line, items_field):
        history.append(item)
      else:
        dropped_items += 1
    users.add(user, not history, line, user_field, items_field)
    if history:
      sequences.append((user, history))
    else:
      dropped_users.append(user)
  log_dropped(path, dropped_items, "interactions with skipped empty items left out")
  log_dropped(path, len(dropped_users), "users with an empty history left out", dropped_users)
  return sequences


def tsv_corpus(
  root: epath.PathLike, name: str, *, id_field: str, text_field: str, empty_documents: str
) -> Corpus:
  """The `Corpus` of a two-column `id TAB text` file `name` in `root` (NQ320k, MS MARCO)."""
  path = require_file(root, name)
  return Corpus(
    path,
    lambda: read_tsv_documents(path, id_field=id_field, text_field=text_field),
    id_field=id_field,
    text_field=text_field,
    empty_documents=empty_documents,
  )


def require_file(root: epath.PathLike, name: str) -> epath.Path:
  """`root/name`, or `root/name.gz`; a DataError naming the expected file if neither exists."""
  path = epath.Path(root) / name
  for candidate in (path, path.with_name(path.name + ".gz")):
    if candidate.exists():
      return candidate
  raise DataError(path, None, None, "file not found (see the builder's manual download notes)")


def read_query_docids(
  path: epath.PathLike, corpus: Corpus, split: str, empty_documents: str = "skip"
) -> list[dict[str, Any]]:
  """DSI/NCI `train.csv` / `test.csv`: `query<TAB>docid[,docid...]` per line, no query ids.

  The query id is `<split>-<row>` (0-based row among the file's records). Returns query
  records (`query_id`, `query`, `relevant_doc_ids`) in file order. An unknown doc id is a
  DataError; skipped empty documents are left out of the lists, counted.
  """
  ids = Ids(path, "query", empty_documents)
  rows, dropped_refs, no_relevant = [], 0, []
  columns = iter_columns(path, ("query", "docid"), header=("query",), first_takes_rest=True)
  for row, (line, cols) in enumerate(columns):
    qid = f"{split}-{row}"
    doc_ids = list(dict.fromkeys(d.strip() for d in cols["docid"].split(",") if d.strip()))
    if not doc_ids:
      raise DataError(path, line, "docid", "no doc id")
    kept = [d for d in doc_ids if corpus.ids.resolve(d, path, line, "docid")]
    if not ids.add(qid, not cols["query"].strip(), line, "query", "query"):
      continue
    dropped_refs += len(doc_ids) - len(kept)
    if kept:
      rows.append({"query_id": qid, "query": cols["query"].strip(), "relevant_doc_ids": kept})
    else:
      no_relevant.append(qid)
  ids.log_skipped()
  log_dropped(path, dropped_refs, "references to skipped empty documents left out")
  log_dropped(path, len(no_relevant), "queries with no relevant document left out", no_relevant)
  return rows


def query_rows(queries: Queries, relevant: Mapping[str, list[str]]) -> list[dict[str, Any]]:
  """Query records of the judged queries, in query-file order."""
  return [
    {"query_id": qid, "query": queries.text[qid], "relevant_doc_ids": relevant[qid]}
    for qid in sorted(relevant, key=queries.ids.index.__getitem__)
  ]
