"""Ranking metrics: exact values on small cases, and trec_eval (pytrec_eval) on random runs."""

import math

import numpy as np
import pytest
import pytrec_eval

from lmindexer_jax import metrics

KS = (1, 3, 5, 10, 20, 100)


def test_single_relevant_doc():
  values = metrics.ir_metrics({"q": ["x", "y", "a", "z"]}, {"q": {"a": 1}}, ks=(1, 5))
  assert values == pytest.approx({
      "recall@1": 0.0, "ndcg@1": 0.0, "mrr@1": 0.0, "hit@1": 0.0,
      "recall@5": 1.0, "ndcg@5": 1 / math.log2(4), "mrr@5": 1 / 3, "hit@5": 1.0,
  })


def test_graded_relevance():
  qrels = {"q": {"a": 3, "b": 1, "c": 2, "n": 0}}
  values = metrics.ir_metrics({"q": ["b", "x", "a", "c"]}, qrels, ks=(1, 3))
  # Ideal order a, c, b: gains 3, 2, 1.
  idcg3 = 3 + 2 / math.log2(3) + 1 / 2
  assert values["ndcg@1"] == pytest.approx(1 / 3)
  assert values["ndcg@3"] == pytest.approx((1 + 3 / 2) / idcg3)
  assert values["recall@1"] == pytest.approx(1 / 3)
  assert values["recall@3"] == pytest.approx(2 / 3)
  assert values["mrr@1"] == values["hit@1"] == 1.0


def test_missing_and_unjudged_queries():
  qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}, "q4": {}}
  run = {"q1": ["a"], "q3": ["c"], "q5": ["d"]}
  qids, values = metrics.ir_metrics_per_query(run, qrels, ks=(1,))
  # q2 has no run entry: 0. q3 and q4 have no relevant doc: skipped. q5 is not in the qrels.
  assert qids == ["q1", "q2"]
  np.testing.assert_array_equal(values["recall@1"], [1.0, 0.0])
  assert metrics.ir_metrics(run, qrels, ks=(1,))["hit@1"] == 0.5


def test_short_run_and_duplicates():
  qrels = {"q": {"a": 1, "b": 1}}
  values = metrics.ir_metrics({"q": ["x", "x", "a", "a"]}, qrels, ks=(2, 100))
  # Distinct ranking: x, a. The second x and a are dropped, so b is never retrieved.
  assert values["mrr@2"] == 0.5
  assert values["recall@2"] == values["recall@100"] == 0.5
  assert values["ndcg@100"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_exclude():
  run = {"q": ["h1", "a", "h2", "b"]}
  qrels = {"q": {"a": 1, "b": 1}}
  values = metrics.ir_metrics(run, qrels, ks=(2,), exclude={"q": {"h1", "h2"}})
  assert values["recall@2"] == values["ndcg@2"] == values["mrr@2"] == 1.0
  # An excluded relevant doc stays relevant but is never retrieved.
  values = metrics.ir_metrics(run, qrels, ks=(2,), exclude={"q": ["a"]})
  assert values["recall@2"] == 0.0 and values["mrr@2"] == 0.0


def test_bad_input():
  with pytest.raises(ValueError, match="positive"):
    metrics.ir_metrics({"q": ["a"]}, {"q": {"a": 1}}, ks=(0, 5))
  with pytest.raises(ValueError, match="no query"):
    metrics.ir_metrics({"q": ["a"]}, {"q": {"a": 0}})


def _random_case(seed: int, graded: bool, num_queries: int = 200):
  """Qrels (graded -1..3, or binary 0/1), runs with duplicates and short runs, missing queries,
  exclusions."""
  rng = np.random.default_rng(seed)
  docs = [f"d{i}" for i in range(150)]
  qrels, run, exclude = {}, {}, {}
  for q in range(num_queries):
    qid = f"q{q}"
    judged = rng.choice(len(docs), size=rng.integers(0, 10), replace=False)
    low, high = (-1, 4) if graded else (0, 2)
    qrels[qid] = {docs[j]: int(rng.integers(low, high)) for j in judged}
    if rng.random() < 0.9:
      # Relevant docs are drawn more often, so top ranks hold some.
      pool = list(judged) * 3 + list(range(len(docs)))
      length = int(rng.choice([0, 3, 15, 60, 130]))
      run[qid] = [docs[pool[j]] for j in rng.integers(0, len(pool), size=length)]
    if rng.random() < 0.3:
      exclude[qid] = {docs[j] for j in rng.choice(len(docs), size=20, replace=False)}
  return run, qrels, exclude


def _reference(run, qrels, ks, exclude):
  """Means from trec_eval over `metrics.scored_queries`, missing queries counting 0."""
  cut = ",".join(map(str, ks))
  qids = metrics.scored_queries(qrels)
  # trec_eval ranks by score: give distinct docs decreasing scores, after exclusion.
  ranked = {}
  for qid in qids:
    docs = [d for d in dict.fromkeys(run.get(qid, ())) if d not in exclude.get(qid, ())]
    if docs:
      ranked[qid] = {d: float(len(docs) - r) for r, d in enumerate(docs)}
  evaluator = pytrec_eval.RelevanceEvaluator(
      {qid: qrels[qid] for qid in qids}, {f"recall.{cut}", f"ndcg_cut.{cut}", f"success.{cut}"}
  )
  results = evaluator.evaluate(ranked)
  means = {}
  for k in ks:
    for ours, theirs in (("recall", "recall"), ("ndcg", "ndcg_cut"), ("hit", "success")):
      means[f"{ours}@{k}"] = sum(
          results[q][f"{theirs}_{k}"] if q in results else 0.0 for q in qids
      ) / len(qids)
    # trec_eval's recip_rank has no cutoff: score the run cut at k.
    top_k = {qid: dict(list(docs.items())[:k]) for qid, docs in ranked.items()}
    rr = pytrec_eval.RelevanceEvaluator(
        {qid: qrels[qid] for qid in qids}, {"recip_rank"}
    ).evaluate(top_k)
    means[f"mrr@{k}"] = sum(rr[q]["recip_rank"] if q in rr else 0.0 for q in qids) / len(qids)
  return means


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("graded", [True, False])
@pytest.mark.parametrize("use_exclude", [False, True])
def test_matches_trec_eval(seed, graded, use_exclude):
  run, qrels, exclude = _random_case(seed, graded)
  exclude = exclude if use_exclude else {}
  expected = _reference(run, qrels, KS, exclude)
  got = metrics.ir_metrics(run, qrels, KS, exclude=exclude)
  assert set(got) == set(expected)
  for name, value in expected.items():
    assert got[name] == pytest.approx(value, abs=1e-6), name


def test_single_relevant_matches_trec_eval():
  """The recommendation shape: one target per query."""
  rng = np.random.default_rng(3)
  qrels = {f"u{u}": {f"i{rng.integers(40)}": 1} for u in range(300)}
  run = {
      u: [f"i{j}" for j in rng.permutation(40)[: rng.integers(0, 40)]] for u in qrels
  }
  expected = _reference(run, qrels, KS, {})
  got = metrics.ir_metrics(run, qrels, KS)
  for name, value in expected.items():
    assert got[name] == pytest.approx(value, abs=1e-6), name
  # One relevant doc: hit and recall agree.
  assert got["hit@10"] == pytest.approx(got["recall@10"])
