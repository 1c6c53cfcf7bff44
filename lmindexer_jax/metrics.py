"""Metric definitions, one place each: ID quality (AMI, collisions, group sizes) and ranking.

Legend: N documents, C ID positions.
"""

from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as sk_metrics


def prefix_clusters(codes_NxC: np.ndarray, length: int) -> np.ndarray:
  """int [N]: one cluster id per distinct prefix c_1..c_length."""
  _, cluster_N = np.unique(np.asarray(codes_NxC)[:, :length], axis=0, return_inverse=True)
  return cluster_N.reshape(-1)


def ami(clusters_N: np.ndarray, labels_N: np.ndarray) -> float:
  """Adjusted mutual information of a clustering against labels; rows labelled -1 are skipped."""
  labels_N = np.asarray(labels_N)
  known = labels_N >= 0 if np.issubdtype(labels_N.dtype, np.integer) else labels_N != ""
  if known.sum() < 2:
    return float("nan")
  return float(sk_metrics.adjusted_mutual_info_score(labels_N[known], clusters_N[known]))


def group_stats(codes_NxC: np.ndarray) -> dict[str, float]:
  """Sizes of the groups of documents sharing a full ID, and the collision rate.

  collision_rate: the fraction of documents whose ID is shared with another document.
  """
  _, counts_G = np.unique(np.asarray(codes_NxC), axis=0, return_counts=True)
  n = counts_G.sum()
  return {
      "num_groups": int(len(counts_G)),
      "max_group_size": int(counts_G.max()),
      "mean_group_size": float(n / len(counts_G)),
      "collision_rate": float(counts_G[counts_G > 1].sum() / n),
  }


# Ranking metrics (trec_eval definitions). Legend: Q scored queries, K the largest cutoff.
#
# A run maps a query id to doc ids in rank order; qrels map a query id to {doc id: grade}, and
# grade > 0 is relevant. Conventions (those of `trec_eval -c`, kept everywhere here):
# - Queries of the qrels with no relevant document are skipped: every metric is undefined there.
# - A scored query missing from the run scores 0 on every metric.
# - Run queries missing from the qrels are ignored.
# - A doc id repeated in a ranking counts once, at its first rank.
# - Unjudged docs are not relevant. Negative grades are not relevant and gain 0.

DEFAULT_KS = (1, 5, 10, 20, 100)
IR_METRICS = ("recall", "ndcg", "mrr", "hit")


def scored_queries(qrels: Mapping[str, Mapping[str, int]]) -> list[str]:
  """Query ids of the qrels with at least one relevant document, in qrels order."""
  return [qid for qid, grades in qrels.items() if any(g > 0 for g in grades.values())]


def _ranked_grades(
    ranking: Sequence[str], grades: Mapping[str, int], excluded: Collection[str], depth: int
) -> list[float]:
  """Grades of the first `depth` distinct, non-excluded docs of a ranking."""
  seen = set(excluded)
  out = []
  for doc_id in ranking:
    if doc_id in seen:
      continue
    seen.add(doc_id)
    out.append(grades.get(doc_id, 0))
    if len(out) == depth:
      break
  return out


def ir_metrics_per_query(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    ks: Sequence[int] = DEFAULT_KS,
    exclude: Mapping[str, Collection[str]] | None = None,
) -> tuple[list[str], dict[str, np.ndarray]]:
  """Recall, NDCG, MRR and hit rate at each cutoff, per scored query.

  Definitions (trec_eval's `recall`, `ndcg_cut`, `recip_rank` cut at k, `success`):
    recall@k: relevant docs in the top k / relevant docs in the qrels.
    ndcg@k: sum over the top k of gain / log2(rank + 1), gain = max(grade, 0), divided by the
      same sum over the qrels' grades sorted in decreasing order.
    mrr@k: 1 / rank of the first relevant doc if it is within the top k, else 0.
    hit@k: 1 if any relevant doc is in the top k, else 0.

  Args:
    run: query id -> doc ids in rank order (any length).
    qrels: query id -> {doc id: grade}.
    ks: cutoffs, positive integers.
    exclude: query id -> doc ids removed from that query's ranking before cutting at k (a
      user's earlier items in recommendation). The qrels are unchanged: an excluded relevant
      doc counts as relevant but not retrieved.

  Returns:
    The scored query ids (see `scored_queries`), and {"recall@10": float [Q], ...}.
  """
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be positive integers, got {ks}")
  qids = scored_queries(qrels)
  depth = max(ks)
  exclude = exclude or {}
  grades_QxK = np.zeros((len(qids), depth), np.float64)
  ideal_QxK = np.zeros((len(qids), depth), np.float64)
  num_rel_Q = np.zeros(len(qids), np.float64)
  for i, qid in enumerate(qids):
    grades = qrels[qid]
    ranked = _ranked_grades(run.get(qid, ()), grades, exclude.get(qid, ()), depth)
    grades_QxK[i, : len(ranked)] = ranked
    positive = sorted((g for g in grades.values() if g > 0), reverse=True)[:depth]
    ideal_QxK[i, : len(positive)] = positive
    num_rel_Q[i] = sum(g > 0 for g in grades.values())

  relevant_QxK = grades_QxK > 0
  discount_K = 1.0 / np.log2(np.arange(2, depth + 2))
  dcg_QxK = np.cumsum(np.maximum(grades_QxK, 0) * discount_K, axis=1)
  idcg_QxK = np.cumsum(ideal_QxK * discount_K, axis=1)
  num_hits_QxK = np.cumsum(relevant_QxK, axis=1)
  # 1-based rank of the first relevant doc; depth + 1 if none is retrieved.
  first_Q = np.where(relevant_QxK.any(axis=1), relevant_QxK.argmax(axis=1) + 1, depth + 1)
  values = {}
  for k in ks:
    found_Q = first_Q <= k
    values[f"recall@{k}"] = num_hits_QxK[:, k - 1] / num_rel_Q
    values[f"ndcg@{k}"] = dcg_QxK[:, k - 1] / idcg_QxK[:, k - 1]
    values[f"mrr@{k}"] = np.where(found_Q, 1.0 / first_Q, 0.0)
    values[f"hit@{k}"] = found_Q.astype(np.float64)
  return qids, values


def ir_metrics(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    ks: Sequence[int] = DEFAULT_KS,
    exclude: Mapping[str, Collection[str]] | None = None,
) -> dict[str, float]:
  """Means over the scored queries of `ir_metrics_per_query` ({"ndcg@10": 0.41, ...}).

  Raises:
    ValueError: if no query of the qrels has a relevant document (every mean is undefined).
  """
  qids, values = ir_metrics_per_query(run, qrels, ks, exclude)
  if not qids:
    raise ValueError("no query of the qrels has a relevant document (grade > 0)")
  return {name: float(v_Q.mean()) for name, v_Q in values.items()}
