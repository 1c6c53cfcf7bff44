"""Run and qrels files (round trips, trec_eval's order, errors) and the metrics table."""

import os

import numpy as np
import pytest
import pytrec_eval

from lmindexer_jax import evaluation
from lmindexer_jax import metrics


def test_run_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  run, scores = {}, {}
  for q in range(20):
    docs = [f"d{j}" for j in rng.permutation(50)[: rng.integers(0, 30)]]
    run[f"q{q}"] = docs
    scores[f"q{q}"] = sorted(rng.normal(size=len(docs)).tolist(), reverse=True)
  path = evaluation.write_run(str(tmp_path / "sub" / "run.txt"), run, scores, tag="mine")
  got_run, got_scores = evaluation.read_run(path)
  # A query with no documents has no line.
  assert got_run == {q: d for q, d in run.items() if d}
  assert got_scores == {q: s for q, s in scores.items() if s}  # Exact: repr round-trips.
  assert os.listdir(tmp_path / "sub") == ["run.txt"]  # No temporary file left.


def test_run_lines_and_default_scores(tmp_path):
  path = evaluation.write_run(str(tmp_path / "run"), {"q1": ["b", "a", "b", "c"], "q2": ["x"]})
  # The repeated b is written once, at its first rank.
  assert (tmp_path / "run").read_text() == (
      "q1 Q0 b 1 3.0 lmindexer\n"
      "q1 Q0 a 2 2.0 lmindexer\n"
      "q1 Q0 c 3 1.0 lmindexer\n"
      "q2 Q0 x 1 1.0 lmindexer\n"
  )
  assert evaluation.read_run(path)[0] == {"q1": ["b", "a", "c"], "q2": ["x"]}


def test_write_run_refuses_an_order_trec_eval_would_change(tmp_path):
  path = str(tmp_path / "run")
  with pytest.raises(ValueError, match="would rank it higher"):
    evaluation.write_run(path, {"q": ["a", "b"]}, {"q": [1.0, 2.0]})
  with pytest.raises(ValueError, match="would rank it higher"):
    evaluation.write_run(path, {"q": ["a", "b"]}, {"q": [1.0, 1.0]})
  # Tied scores with decreasing doc ids are trec_eval's own order.
  evaluation.write_run(path, {"q": ["b", "a"]}, {"q": [1.0, 1.0]})
  assert evaluation.read_run(path)[0] == {"q": ["b", "a"]}
  for bad in ({"q 1": ["a"]}, {"q": ["a b"]}, {"q": [""]}):
    with pytest.raises(ValueError, match="whitespace"):
      evaluation.write_run(path, bad)
  with pytest.raises(ValueError, match="2 doc ids but 1 scores"):
    evaluation.write_run(path, {"q": ["a", "b"]}, {"q": [1.0]})
  with pytest.raises(ValueError, match="not finite"):
    evaluation.write_run(path, {"q": ["a"]}, {"q": [float("nan")]})
  assert evaluation.read_run(path)[0] == {"q": ["b", "a"]}  # Failed writes left it as it was.


def test_read_run_orders_as_trec_eval(tmp_path):
  """Shuffled lines, ranks that disagree with scores, many tied scores: trec_eval's order."""
  rng = np.random.default_rng(1)
  qrels, raw, lines = {}, {}, []
  for q in range(100):
    qid = f"q{q}"
    qrels[qid] = {f"d{j}": int(rng.integers(0, 3)) for j in rng.choice(40, 6, replace=False)}
    raw[qid] = {f"d{j}": float(rng.integers(0, 4)) for j in rng.permutation(40)[:25]}
    lines += [f"{qid} Q0 {d} {rng.integers(1, 99)} {s} tag\n" for d, s in raw[qid].items()]
  rng.shuffle(lines)
  (tmp_path / "run").write_text("".join(lines))
  run, scores = evaluation.read_run(str(tmp_path / "run"))
  for qid, docs in run.items():
    assert scores[qid] == sorted(scores[qid], reverse=True)
    assert docs == sorted(raw[qid], key=lambda d: (raw[qid][d], d), reverse=True)
  ks = (1, 5, 10, 20)
  got = metrics.ir_metrics(run, qrels, ks)
  cut = ",".join(map(str, ks))
  scored = metrics.scored_queries(qrels)
  results = pytrec_eval.RelevanceEvaluator(
      {q: qrels[q] for q in scored}, {f"ndcg_cut.{cut}", f"recall.{cut}"}
  ).evaluate(raw)
  for k in ks:
    for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall")):
      expected = np.mean([results[q][f"{theirs}_{k}"] for q in scored])
      assert got[f"{ours}@{k}"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "text, match",
    [
        ("q Q0 a 1 1.0\n", r"run:1: a run line has 6 fields, found 5"),
        ("q Q0 a 1 1.0 t\n\nq Q0 b 2 high t\n", r"run:3: score 'high'"),
        ("q Q0 a 1 1.0 t\nq Q0 a 2 0.5 t\n", r"run:2: doc id 'a' repeats within query 'q'"),
    ],
)
def test_read_run_errors(tmp_path, text, match):
  (tmp_path / "run").write_text(text)
  with pytest.raises(ValueError, match=match):
    evaluation.read_run(str(tmp_path / "run"))


def test_qrels_round_trip_and_errors(tmp_path):
  qrels = {"q1": {"a": 2, "b": 0, "c": -1}, "q2": {"a": 1}}
  path = evaluation.write_qrels(str(tmp_path / "qrels"), qrels)
  assert (tmp_path / "qrels").read_text().splitlines()[0] == "q1 0 a 2"
  assert evaluation.read_qrels(path) == qrels
  (tmp_path / "bad").write_text("q 0 a 1\nq 0 b x\n")
  with pytest.raises(ValueError, match=r"bad:2: grade 'x'"):
    evaluation.read_qrels(str(tmp_path / "bad"))
  (tmp_path / "bad").write_text("q 0 a 1\nq 0 a 0\n")
  with pytest.raises(ValueError, match=r"bad:2: doc id 'a' is judged twice"):
    evaluation.read_qrels(str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="not an integer"):
    evaluation.write_qrels(str(tmp_path / "q"), {"q": {"a": 0.5}})


def test_evaluate_files(tmp_path):
  run = {"q1": ["x", "a", "b"], "q2": ["c"], "q3": ["a"]}
  qrels = {"q1": {"a": 1, "b": 2}, "q2": {"d": 1}, "q3": {"a": 0}}
  got = evaluation.evaluate_files(
      evaluation.write_run(str(tmp_path / "run"), run),
      evaluation.write_qrels(str(tmp_path / "qrels"), qrels), ks=(1, 5),
      exclude={"q1": ["x"]},
  )
  assert got == metrics.ir_metrics(run, qrels, (1, 5), exclude={"q1": ["x"]})
  assert got["mrr@1"] == 0.5  # q1 finds a at rank 1 once x is removed; q2 finds nothing.


def test_format_table():
  rows = {
      "synthetic/lmindexer": {"recall@1": 0.5, "recall@10": 0.91234, "ndcg@10": 0.7},
      "rq-vae": {"recall@10": 1.0, "docs": 2048},
  }
  table = evaluation.format_table(rows, row_header="scheme", digits=3)
  assert table == (
      "scheme               recall@1  recall@10  ndcg@10  docs\n"
      "synthetic/lmindexer     0.500      0.912    0.700     -\n"
      "rq-vae                      -      1.000        -  2048\n"
  )
  assert evaluation.format_table(rows, ["ndcg@10"]).splitlines()[1].split() == [
      "synthetic/lmindexer", "0.7000"]
  assert evaluation.ranking_columns((1, 10), ("recall", "ndcg")) == [
      "recall@1", "recall@10", "ndcg@1", "ndcg@10"]
