"""TREC run and qrels files, and the plain-text table of metrics per task or scheme.

A run file has one line per retrieved document, `qid Q0 docid rank score tag`; a qrels file one
line per judgement, `qid 0 docid grade`; fields are separated by whitespace. These are the
files `trec_eval` reads, so a run written here can be scored by it as well as by `metrics.py`.

trec_eval ignores the rank column: it orders a query's documents by score, decreasing, and
breaks ties by docid, decreasing. `read_run` orders them the same way, and `write_run` refuses
scores that would make trec_eval see another order than the one written; without scores it
writes n, n - 1, ..., 1.
"""

from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence
import math
import numbers

from lmindexer_jax import files
from lmindexer_jax import metrics

DEFAULT_TAG = "lmindexer"


def _check_token(kind: str, value: str) -> None:
  if not value or any(c.isspace() for c in value):
    raise ValueError(f"{kind} {value!r} is empty or contains whitespace")


def write_run(
    path: str,
    run: Mapping[str, Sequence[str]],
    scores: Mapping[str, Sequence[float]] | None = None,
    tag: str = DEFAULT_TAG,
) -> str:
  """Writes a TREC run file atomically, queries in `run`'s order, documents in rank order.

  A doc id repeated in a ranking is written once, at its first rank (as `metrics` counts it).

  Args:
    path: the file; its directory is created.
    run: query id -> doc ids in rank order.
    scores: query id -> one score per doc id of `run[qid]`, non-increasing; ties are
      allowed only between doc ids in decreasing order (trec_eval's tie order). None: the
      scores n, n - 1, ..., 1 for the n distinct doc ids.
    tag: the run's name (last column).

  Returns:
    `path`.
  """
  _check_token("tag", tag)
  lines = []
  for qid, docs in run.items():
    _check_token("query id", qid)
    if scores is not None and len(scores[qid]) != len(docs):
      raise ValueError(f"query {qid}: {len(docs)} doc ids but {len(scores[qid])} scores")
    first: dict[str, float | None] = {}  # doc id -> score at its first rank
    for r, doc_id in enumerate(docs):
      _check_token("doc id", doc_id)
      if doc_id not in first:
        first[doc_id] = None if scores is None else float(scores[qid][r])
    kept = [
        (doc_id, float(len(first) - r) if score is None else score)
        for r, (doc_id, score) in enumerate(first.items())
    ]
    for doc_id, score in kept:
      if not math.isfinite(score):
        raise ValueError(f"query {qid}: score {score} of {doc_id} is not finite")
    for (prev_doc, prev_score), (doc_id, score) in zip(kept, kept[1:], strict=False):
      if score > prev_score or (score == prev_score and doc_id > prev_doc):
        raise ValueError(
            f"query {qid}: {doc_id} (score {score!r}) follows {prev_doc} (score "
            f"{prev_score!r}); trec_eval would rank it higher (scores must not increase, and "
            "tied doc ids must decrease)"
        )
    lines.extend(
        f"{qid} Q0 {doc_id} {rank} {score!r} {tag}\n"
        for rank, (doc_id, score) in enumerate(kept, start=1)
    )
  return files.write_text(path, "".join(lines))


def _fields(path: str, expected: int, kind: str):
  """(line number, fields) of each non-blank line, which must have `expected` fields."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != expected:
        raise ValueError(
            f"{path}:{number}: a {kind} line has {expected} fields, found {len(fields)}: "
            f"{line.strip()!r}"
        )
      yield number, fields


def read_run(path: str) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
  """Reads a TREC run file, each query's documents in the order trec_eval ranks them.

  Returns:
    (run, scores): query id -> doc ids in rank order, and query id -> their scores; queries in
    order of first appearance.

  Raises:
    ValueError: naming the file and line, for a line without 6 fields, a score that is not a
      finite number, or a doc id repeated within a query.
  """
  entries: dict[str, dict[str, float]] = {}
  for number, (qid, _, doc_id, _, score_text, _) in _fields(path, 6, "run"):
    try:
      score = float(score_text)
    except ValueError:
      score = math.nan
    if not math.isfinite(score):
      raise ValueError(f"{path}:{number}: score {score_text!r} is not a finite number")
    docs = entries.setdefault(qid, {})
    if doc_id in docs:
      raise ValueError(f"{path}:{number}: doc id {doc_id!r} repeats within query {qid!r}")
    docs[doc_id] = score
  run, scores = {}, {}
  for qid, docs in entries.items():
    # Score decreasing, then doc id decreasing: trec_eval's order.
    ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
    run[qid] = [doc_id for doc_id, _ in ranked]
    scores[qid] = [score for _, score in ranked]
  return run, scores


def write_qrels(path: str, qrels: Mapping[str, Mapping[str, int]]) -> str:
  """Writes a TREC qrels file atomically (`qid 0 docid grade`), in `qrels`' order."""
  lines = []
  for qid, grades in qrels.items():
    _check_token("query id", qid)
    for doc_id, grade in grades.items():
      _check_token("doc id", doc_id)
      if int(grade) != grade:
        raise ValueError(f"query {qid}: grade {grade!r} of {doc_id} is not an integer")
      lines.append(f"{qid} 0 {doc_id} {int(grade)}\n")
  return files.write_text(path, "".join(lines))


def read_qrels(path: str) -> dict[str, dict[str, int]]:
  """Reads a TREC qrels file: query id -> {doc id: grade}; grade > 0 is relevant.

  Raises:
    ValueError: naming the file and line, for a line without 4 fields, a grade that is not an
      integer, or a (query, doc) judged twice.
  """
  qrels: dict[str, dict[str, int]] = {}
  for number, (qid, _, doc_id, grade_text) in _fields(path, 4, "qrels"):
    try:
      grade = int(grade_text)
    except ValueError:
      raise ValueError(f"{path}:{number}: grade {grade_text!r} is not an integer") from None
    grades = qrels.setdefault(qid, {})
    if doc_id in grades:
      raise ValueError(f"{path}:{number}: doc id {doc_id!r} is judged twice for query {qid!r}")
    grades[doc_id] = grade
  return qrels


def evaluate_files(
    run_path: str,
    qrels_path: str,
    ks: Sequence[int] = metrics.DEFAULT_KS,
    exclude: Mapping[str, Collection[str]] | None = None,
) -> dict[str, float]:
  """`metrics.ir_metrics` of a run file against a qrels file."""
  run, _ = read_run(run_path)
  return metrics.ir_metrics(run, read_qrels(qrels_path), ks, exclude)


def ranking_columns(
    ks: Sequence[int] = metrics.DEFAULT_KS, names: Sequence[str] = metrics.IR_METRICS
) -> list[str]:
  """Column names grouped by metric: recall@1, recall@5, ..., ndcg@1, ..."""
  return [f"{name}@{k}" for name in names for k in ks]


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    columns: Sequence[str] | None = None,
    *,
    digits: int = 4,
    row_header: str = "",
) -> str:
  """A plain-text table: one row per task or scheme, one column per metric.

  Args:
    rows: row name -> {metric name: value}.
    columns: the metrics to show, in order; None: every metric of `rows`, in order of first
      appearance.
    digits: decimals of float values (ints are shown as they are).
    row_header: the first column's header.

  Returns:
    The table, columns separated by two spaces, numbers right-aligned; a metric a row lacks
    shows as `-`. Ends with a newline.
  """
  if columns is None:
    columns = list(dict.fromkeys(name for values in rows.values() for name in values))

  def cell(value) -> str:
    if value is None:
      return "-"
    if isinstance(value, numbers.Integral):
      return str(int(value))
    return f"{float(value):.{digits}f}"

  header = [row_header, *columns]
  body = [[name, *(cell(values.get(c)) for c in columns)] for name, values in rows.items()]
  widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
  out = []
  for line in [header, *body]:
    first = line[0].ljust(widths[0])
    rest = (text.rjust(width) for text, width in zip(line[1:], widths[1:], strict=True))
    out.append("  ".join([first, *rest]).rstrip() + "\n")
  return "".join(out)
