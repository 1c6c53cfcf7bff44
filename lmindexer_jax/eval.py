r"""Evaluates a fine-tuning run: constrained beam search over its IDs, TREC run, ranking metrics.

  python -m lmindexer_jax.eval --model_dir=runs/retrieval [--split=test] [--beam=20] \
    [--num_return=20] [--output_dir=...]

The run is rebuilt from what fine-tuning left in MODEL_DIR: `init.json` (written by
`finetune.initial_params`) holds the model's config, the task, its feature lengths, the ID file
and the task settings in force (corpus sizes, data folders); the parameters are the latest
checkpoint's. The split's queries are the seqio task's own examples (tokenized and truncated as
in training): `retrieval_indexing` runs are evaluated on `retrieval` (a query -> its relevant
documents), `search` on `search`, `rec`/`rec_titles` on themselves (a user's history -> the
next item, leave-last-out). Each query decodes `num_return` IDs with `decoding.IdDecoder` over
the trie of the run's ID file; IDs map back to documents (`decoding.ranked_documents`).

Writes to the output directory (MODEL_DIR by default): `run_<split>.trec` (the ranking, scores
are the IDs' log-probabilities), `qrels_<split>.txt`, and `metrics_<split>.json`: Recall, NDCG,
MRR and hit rate at each cutoff K <= num_return (a ranking of R IDs says nothing past R), the
number of decoded IDs (of both searches, below) not in the ID file (`invalid_ids`, 0 when the
trie holds), and, for recommendation, the same metrics with the user's earlier items removed
from the ranking (`metrics_excluding_history`; `metrics` keeps them, as TIGER and the paper
report). Removing them after the search would leave fewer than R items; instead a second
search may not return an earlier item's ID nor enter a prefix that leads only to such IDs
(`decoding.beam_search(excluded_nodes_BxH=...)`, as RecBole masks earlier items before
ranking), so its R IDs are the best others it reaches (`run_<split>_excluding_history.trec`).

Legend: B queries per batch, L input length, R returned IDs, C ID positions.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import seqio

from lmindexer_jax import decoding
from lmindexer_jax import evaluation
from lmindexer_jax import files
from lmindexer_jax import finetune
from lmindexer_jax import metrics
from lmindexer_jax import t5
from tasks import corpus
from tasks import registration
from tasks import semantic_ids
from tasks import settings

# The task a fine-tuning task is evaluated on (others: itself).
EVAL_TASKS = {"retrieval_indexing": "retrieval", "retrieval": "retrieval", "search": "search",
              "rec": "rec", "rec_titles": "rec_titles"}
REC_TASKS = ("rec", "rec_titles")
METRICS_FILE = "metrics_{split}.json"
RUN_FILE = "run_{split}.trec"
EXCLUDING_HISTORY_RUN_FILE = "run_{split}_excluding_history.trec"
QRELS_FILE = "qrels_{split}.txt"


@dataclasses.dataclass(frozen=True)
class Queries:
  """A split's queries, tokenized as the task tokenizes them.

  Attributes:
    query_ids: [Q] unique ids (a rec query is its user; `#i` suffixes where a user repeats).
    tokens_QxL: int32 inputs, 0-padded to the task's input length.
    qrels: query id -> {doc id: 1} for every relevant document.
    earlier: query id -> the user's items before the target (rec only, else empty).
  """

  query_ids: tuple[str, ...]
  tokens_QxL: np.ndarray
  qrels: dict[str, dict[str, int]]
  earlier: dict[str, tuple[str, ...]]


def eval_task_name(task_name: str) -> str:
  """`lmindexer.<dataset>.retrieval_indexing` -> `lmindexer.<dataset>.retrieval`, etc."""
  prefix, _, task = task_name.rpartition(".")
  if task not in EVAL_TASKS:
    raise ValueError(f"{task_name}: no evaluation for task {task!r} (known: {sorted(EVAL_TASKS)})")
  return f"{prefix}.{EVAL_TASKS[task]}"


def _dataset_name(task_name: str) -> str:
  return task_name.split(".")[1]


def _earlier_items(dataset: str, split: str) -> dict[str, list[tuple[str, ...]]]:
  """user id -> the items before each of its `split` targets (all of them, not the history
  window the task's inputs keep), in the order `corpus.rec_examples` lists the targets."""
  source = registration.corpus_source(dataset)
  out = {}
  for u, items in enumerate(source.sequences):
    user = source.user_ids[u] if source.user_ids is not None else str(u)
    if len(items) < 3:
      continue
    # train: the example's own history is used.
    targets = corpus.target_positions(len(items), split) if split != "train" else ()
    out[user] = [tuple(items[:j]) for j in targets]
  return out


def load_queries(task_name: str, split: str, feature_lengths: Mapping[str, int]) -> Queries:
  """The split's queries of an evaluation task (`eval_task_name`), one row per query."""
  task = seqio.get_mixture_or_task(task_name)
  lengths = {"inputs": int(feature_lengths["inputs"]),
             "targets": int(feature_lengths.get("targets", 8))}
  ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1, use_cached=False)
  is_rec = task_name.rpartition(".")[2] in REC_TASKS
  earlier_of = _earlier_items(_dataset_name(task_name), split) if is_rec else {}
  seen_users: dict[str, int] = {}
  query_ids, rows, qrels, earlier = [], [], {}, {}
  for ex in ds.as_numpy_iterator():
    doc_id = ex["doc_id"].decode()
    if is_rec:
      user = ex["user_id"].decode()
      i = seen_users.get(user, 0)
      seen_users[user] = i + 1
      qid = user if i == 0 else f"{user}#{i}"
      items = earlier_of.get(user, [])
      earlier[qid] = items[i] if i < len(items) else tuple(h.decode() for h in ex["history"])
    else:
      qid = ex["query_id"].decode()
    if qid not in qrels:
      query_ids.append(qid)
      rows.append(ex["inputs"])
      qrels[qid] = {}
    qrels[qid][doc_id] = 1
  tokens_QxL = np.zeros((len(rows), lengths["inputs"]), np.int32)
  for i, row in enumerate(rows):
    tokens_QxL[i, :len(row)] = row
  return Queries(tuple(query_ids), tokens_QxL, qrels, earlier)


def latest_params(model_dir: str) -> tuple[int, Any]:
  """(step, parameters on the host) of the run's latest checkpoint."""
  directory = os.path.abspath(os.path.join(model_dir, "checkpoints"))
  steps = [int(p) for p in os.listdir(directory) if p.isdigit()] if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(f"{model_dir}: no checkpoints/<step>/ (has the run trained?)")
  step = max(steps)
  checkpointer = ocp.StandardCheckpointer()
  state = checkpointer.restore(os.path.join(directory, str(step), "state"))
  checkpointer.close()
  return step, state["params"]


def read_record(model_dir: str) -> dict[str, Any]:
  """The run's `init.json`, which must hold `finetune.run_record`'s fields."""
  path = os.path.join(model_dir, finetune.INIT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not a fine-tuning run (no {finetune.INIT_FILE})")
  with open(path) as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
  missing = [k for k in ("t5_config", "feature_lengths", "id_file", "task") if k not in record]
  if missing:
    raise ValueError(f"{path} lacks {missing}: the run was started before fine-tuning recorded "
                     "them (finetune.initial_params(feature_lengths=...)); fine-tune it again")
  return record


def _strictly_decreasing(scores: Sequence[float]) -> list[float]:
  """Scores nudged down by an ulp where they tie, so trec_eval keeps the written order."""
  out: list[float] = []
  for s in map(float, scores):
    out.append(s if not out or s < out[-1] else float(np.nextafter(out[-1], -np.inf)))
  return out


def excluded_nodes(trie: decoding.Trie, doc_ids: Sequence[str],
                   queries: Queries) -> np.ndarray:
  """int32 [Q, H]: per query, `trie.covered_nodes` of the IDs all of whose documents are its
  earlier items, -1 padded (H >= 1). An ID shared with other documents stays allowed."""
  offsets, rows = np.asarray(trie.doc_offsets), np.asarray(trie.doc_rows)
  docs_per_id = np.diff(offsets)
  id_of_row = np.empty(len(rows), np.int64)
  id_of_row[rows] = np.repeat(np.arange(len(docs_per_id)), docs_per_id)
  row_of = {d: i for i, d in enumerate(doc_ids)}
  per_query = []
  for qid in queries.query_ids:
    earlier = [id_of_row[row_of[d]] for d in set(queries.earlier.get(qid, ())) if d in row_of]
    ids, counts = np.unique(np.asarray(earlier, np.int64), return_counts=True)
    per_query.append(trie.covered_nodes(ids[counts == docs_per_id[ids]]))
  out = np.full((len(per_query), max([1, *map(len, per_query)])), -1, np.int32)
  for i, ids in enumerate(per_query):
    out[i, :len(ids)] = ids
  return out


def decode_run(
    decoder: decoding.IdDecoder, trie: decoding.Trie, queries: Queries, doc_ids: Sequence[str],
    *, batch_size: int, excluded_nodes_QxH: np.ndarray | None = None,
) -> tuple[dict[str, list[str]], dict[str, list[float]], np.ndarray]:
  """Ranked documents, their scores, and the decoded codes int32 [Q, R, C] (-1: unfilled).

  `decoder` searches `trie`. Queries go in batches of one shape (the last padded with copies
  of its first row), so the decoder compiles once. `excluded_nodes_QxH` (`excluded_nodes`):
  trie nodes each query may not enter.
  """
  num_queries = len(queries.query_ids)
  batch_size = max(1, min(batch_size, num_queries))

  def batch_of(x_QxX, start):
    x_BxX = x_QxX[start:start + batch_size]
    return np.concatenate([x_BxX, np.repeat(x_BxX[:1], batch_size - len(x_BxX), 0)])

  run, scores, codes = {}, {}, []
  for start in range(0, num_queries, batch_size):
    count = min(batch_size, num_queries - start)
    result = decoder(batch_of(queries.tokens_QxL, start),
                     None if excluded_nodes_QxH is None else batch_of(excluded_nodes_QxH, start))
    result = decoding.BeamSearchResult(*(np.asarray(x)[:count] for x in (
        result.codes, result.scores, result.id_index, result.valid)))
    offsets, rows = np.asarray(trie.doc_offsets), np.asarray(trie.doc_rows)
    for i in range(count):
      qid = queries.query_ids[start + i]
      docs, doc_scores = [], []
      for u, score, ok in zip(result.id_index[i], result.scores[i], result.valid[i],
                              strict=True):
        if ok:
          for row in rows[offsets[u]:offsets[u + 1]]:
            docs.append(doc_ids[row])
            doc_scores.append(float(score))
      run[qid], scores[qid] = docs, _strictly_decreasing(doc_scores)
    codes.append(result.codes)
  return run, scores, np.concatenate(codes)


def count_invalid(codes_QxRxC: np.ndarray, ids: semantic_ids.SemanticIds) -> tuple[int, int]:
  """(decoded IDs not in the ID file, unfilled entries) among the returned codes."""
  valid = {tuple(row) for row in np.asarray(ids.codes).tolist()}
  flat = np.asarray(codes_QxRxC).reshape(-1, codes_QxRxC.shape[-1])
  filled = (flat >= 0).all(axis=1)
  invalid = sum(tuple(row) not in valid for row in flat[filled].tolist())
  return int(invalid), int((~filled).sum())


def evaluate(
    model_dir: str,
    *,
    split: str = "test",
    beam_size: int = 20,
    num_return: int | None = None,
    output_dir: str | None = None,
    batch_size: int = 64,
    normalization: str = "full",
    ks: Sequence[int] = metrics.DEFAULT_KS,
    verbose: bool = True,
) -> dict[str, Any]:
  """Evaluates the fine-tuning run in `model_dir` on `split`; returns what it writes.

  Args:
    model_dir: the fine-tuning run's MODEL_DIR (init.json and checkpoints/).
    split: 'train', 'validation' or 'test'.
    beam_size: beams of the constrained search.
    num_return: IDs returned per query (<= beam_size; default beam_size).
    output_dir: where the run, qrels and metrics files go (default model_dir).
    batch_size: queries per decoder call.
    normalization: `decoding` scores ('full': exact log-softmax over the vocabulary).
    ks: cutoffs; only those <= num_return are reported.
    verbose: print a progress line and the table.

  Returns:
    The contents of `metrics_<split>.json`.
  """
  start_time = time.time()
  record = read_record(model_dir)
  num_return = beam_size if num_return is None else int(num_return)
  ks = tuple(k for k in ks if k <= num_return)
  if not ks:
    raise ValueError(f"no cutoff of {tuple(metrics.DEFAULT_KS)} is <= num_return={num_return}")
  output_dir = output_dir or model_dir
  task_name = eval_task_name(record["task"])
  is_rec = task_name.rpartition(".")[2] in REC_TASKS
  id_file = semantic_ids.IdFile(record["id_file"])
  configs = [c for c in finetune.settings_from_record(record)
             if not isinstance(c, semantic_ids.IdFile)]
  saved_id_file = next((c for c in finetune.settings_from_record(record)
                        if isinstance(c, semantic_ids.IdFile)), None)
  if saved_id_file is not None:
    id_file = dataclasses.replace(saved_id_file, path=record["id_file"])
  with settings.configured(*configs, id_file):
    layout = finetune.task_id_vocabulary(task_name).layout
    source = registration.corpus_source(_dataset_name(task_name))
    ids = semantic_ids.load(id_file, source.doc_ids)
    queries = load_queries(task_name, split, record["feature_lengths"])
  config = finetune.t5_config_from_record(record)
  if config.vocab_size != layout.vocab_size:
    raise ValueError(f"{model_dir}: the model's vocab_size {config.vocab_size} is not the "
                     f"vocabulary size of {task_name} with {id_file.path} ({layout.vocab_size})")
  step, params = latest_params(model_dir)
  trie = decoding.Trie.from_semantic_ids(ids, layout.base_size)
  if verbose:
    print(f"[eval] {task_name} {split}: {len(queries.query_ids)} queries, {trie.num_ids} IDs, "
          f"beam {beam_size}, step {step} of {model_dir}", flush=True)
  decoder = decoding.IdDecoder(t5.Transformer(config), params, trie, beam_size=beam_size,
                               num_return=num_return, normalization=normalization)
  run, scores, codes_QxRxC = decode_run(decoder, trie, queries, ids.doc_ids,
                                        batch_size=batch_size)
  runs = {RUN_FILE: (run, scores, codes_QxRxC)}
  if is_rec:
    runs[EXCLUDING_HISTORY_RUN_FILE] = decode_run(
        decoder, trie, queries, ids.doc_ids, batch_size=batch_size,
        excluded_nodes_QxH=excluded_nodes(trie, ids.doc_ids, queries))
  invalid, unfilled = np.sum([count_invalid(codes, ids) for _, _, codes in runs.values()], 0)
  run_paths = {name: evaluation.write_run(os.path.join(output_dir, name.format(split=split)),
                                          *runs[name][:2]) for name in runs}
  qrels_path = evaluation.write_qrels(os.path.join(output_dir, QRELS_FILE.format(split=split)),
                                      queries.qrels)
  result: dict[str, Any] = {
      "task": task_name,
      "finetune_task": record["task"],
      "split": split,
      "init": record.get("init"),
      "step": step,
      "id_file": id_file.path,
      "num_queries": len(queries.query_ids),
      "beam_size": beam_size,
      "num_return": num_return,
      "normalization": normalization,
      "ks": list(ks),
      "metrics": metrics.ir_metrics(run, queries.qrels, ks),
      "invalid_ids": int(invalid),
      "unfilled": int(unfilled),
      "run_file": run_paths[RUN_FILE],
      "qrels_file": qrels_path,
  }
  if is_rec:
    result["metrics_excluding_history"] = metrics.ir_metrics(
        runs[EXCLUDING_HISTORY_RUN_FILE][0], queries.qrels, ks, exclude=queries.earlier)
    result["run_file_excluding_history"] = run_paths[EXCLUDING_HISTORY_RUN_FILE]
  result["seconds"] = round(time.time() - start_time, 1)
  files.write_json(os.path.join(output_dir, METRICS_FILE.format(split=split)), result)
  if verbose:
    print(table(result), end="", flush=True)
  return result


def table(result: Mapping[str, Any]) -> str:
  """The plain-text table of one `evaluate` result (a second row for rec without history)."""
  name = result["task"].rpartition(".")[2]
  rows = {f"{name} ({result['split']})": {**result["metrics"], "invalid": result["invalid_ids"]}}
  names = ["recall", "ndcg", "mrr"]
  if "metrics_excluding_history" in result:
    names.append("hit")
    rows[f"{name}, earlier items removed"] = {**result["metrics_excluding_history"],
                                              "invalid": result["invalid_ids"]}
  columns = [*evaluation.ranking_columns(result["ks"], names), "invalid"]
  return evaluation.format_table(rows, columns)


def main(argv: Sequence[str]) -> None:
  del argv
  evaluate(FLAGS.model_dir, split=FLAGS.split, beam_size=FLAGS.beam, num_return=FLAGS.num_return,
           output_dir=FLAGS.output_dir or None, batch_size=FLAGS.batch_size,
           normalization=FLAGS.normalization)


if __name__ == "__main__":
  from absl import flags

  from lmindexer_jax import gin_utils  # one-line errors for bad input, as the trainer has

  flags.DEFINE_string("model_dir", None, "The fine-tuning run's MODEL_DIR.", required=True)
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "The split to evaluate.")
  flags.DEFINE_integer("beam", 20, "Beams of the constrained search.")
  flags.DEFINE_integer("num_return", None, "IDs returned per query (default: --beam).")
  flags.DEFINE_string("output_dir", "", "Where to write the files (default: --model_dir).")
  flags.DEFINE_integer("batch_size", 64, "Queries per decoder call.")
  flags.DEFINE_enum("normalization", "full", list(decoding.NORMALIZATIONS),
                    "Beam scores: full log-softmax, or over the allowed codes only.")
  FLAGS = flags.FLAGS
  gin_utils.launch(main)
