"""Evaluating a fine-tuned run: TREC run file, metrics equal to metrics.py's, no invalid IDs."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import xla_env

from lmindexer_jax import decoding
from lmindexer_jax import eval as eval_lib
from lmindexer_jax import evaluation
from lmindexer_jax import experiment
from lmindexer_jax import finetune
from lmindexer_jax import metrics
from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import vocabularies
from tasks import semantic_ids
from tasks import settings
from tasks import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = synthetic.CorpusConfig(
    num_docs=96, branching=(4, 2, 2), words_per_topic=(8, 6, 4), num_users=24, vocab_size=300
)
CODEBOOKS = (4, 4)
T5_CONFIG = t5.T5Config(vocab_size=0, emb_dim=32, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, head_dim=16, mlp_dim=64,
                        mlp_activations=("gelu", "linear"), logits_via_embedding=False)
BUDGET = experiment.FinetuneConfig(train_steps=40, batch_size=16, learning_rate=3e-3,
                                   warmup_steps=4, target_length=4, log_period=20)
BEAM = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Retrieval and rec runs fine-tuned on random IDs of the tiny corpus, and their evaluation."""
  root = tmp_path_factory.mktemp("eval")
  doc_ids = synthetic.build(TINY).doc_ids
  codes = np.random.default_rng(0).integers(0, 4, size=(len(doc_ids), len(CODEBOOKS)))
  codes, size = semantic_ids.append_disambiguation(codes)
  id_file = semantic_ids.write(str(root / semantic_ids.FILE_NAME), doc_ids, codes,
                               codebook_sizes=CODEBOOKS, disambiguation_size=size)
  out = {"id_file": id_file}
  # Both runs have the same shapes: the second compiles nothing (JAX's persistent cache).
  with experiment.compilation_cache_at(str(root / "jax_cache")):
    with settings.configured(TINY):
      for task, length in (("retrieval_indexing", 32), ("rec", 32)):
        model_dir = str(root / task)
        experiment.finetune_run(
            model_dir=model_dir, task_name=f"lmindexer.synthetic.{task}", id_file=id_file,
            t5_config=T5_CONFIG, input_length=length, config=BUDGET,
            partitioner=partitioning.Partitioner(num_devices=1))
        out[task] = (model_dir, eval_lib.evaluate(model_dir, beam_size=BEAM, batch_size=16))
  return out


def _test_qrels(split="test"):
  return {q.query_id: {d: 1 for d in q.doc_ids} for q in synthetic.build(TINY).queries[split]}


def test_retrieval_run_file_and_metrics(runs):
  model_dir, result = runs["retrieval_indexing"]
  assert result["task"] == "lmindexer.synthetic.retrieval"
  assert result["ks"] == [1, 5]  # only cutoffs <= the beam
  assert result["invalid_ids"] == 0 and result["unfilled"] == 0
  qrels = _test_qrels()
  assert result["num_queries"] == len(qrels)
  assert evaluation.read_qrels(result["qrels_file"]) == qrels
  run, scores = evaluation.read_run(result["run_file"])
  assert list(run) == list(qrels)
  ids = semantic_ids.read(runs["id_file"])
  for qid, docs in run.items():
    assert len(docs) == BEAM and len(set(docs)) == BEAM  # one document per (unique) ID
    assert set(docs) <= set(ids.doc_ids)
    assert all(a > b for a, b in zip(scores[qid], scores[qid][1:], strict=False))
    assert all(s <= 0 for s in scores[qid])  # log-probabilities
  assert result["metrics"] == metrics.ir_metrics(run, qrels, (1, 5))
  on_disk = json.loads((pathlib.Path(model_dir) / "metrics_test.json").read_text())
  assert on_disk == result
  assert "metrics_excluding_history" not in result


def test_rec_metrics_with_and_without_earlier_items(runs):
  _, result = runs["rec"]
  assert result["task"] == "lmindexer.synthetic.rec" and result["invalid_ids"] == 0
  corpus = synthetic.build(TINY)
  users = [(f"u{u}", [corpus.doc_ids[i] for i in h]) for u, h in enumerate(corpus.histories)]
  qrels = {user: {items[-1]: 1} for user, items in users}
  earlier = {user: items[:-1] for user, items in users}
  run, _ = evaluation.read_run(result["run_file"])
  assert evaluation.read_qrels(result["qrels_file"]) == qrels
  assert result["metrics"] == metrics.ir_metrics(run, qrels, (1, 5))
  # The second search may not return an earlier item, so the removal does not cut the
  # ranking short (the first search's would be: earlier items are among its IDs).
  without, _ = evaluation.read_run(result["run_file_excluding_history"])
  assert list(without) == list(run)
  for user, docs in without.items():
    assert not set(docs) & set(earlier[user]) and len(docs) == BEAM
  assert any(set(run[user]) & set(earlier[user]) for user in run)
  assert result["metrics_excluding_history"] == metrics.ir_metrics(without, qrels, (1, 5),
                                                                   exclude=earlier)
  assert {"hit@1", "hit@5"} <= set(result["metrics"])
  assert "earlier items removed" in eval_lib.table(result)


def test_excluded_nodes_keep_ids_shared_with_other_documents():
  layout = vocabularies.IdLayout(base_size=4, codebook_sizes=(3,))
  # Documents a and c share ID 0 (leaf 1); b has ID 1 (leaf 2); d has ID 2 (leaf 3).
  trie = decoding.Trie.from_codes(np.array([[0], [1], [0], [2]]), layout)
  queries = eval_lib.Queries(query_ids=("u", "v", "w"), tokens_QxL=np.zeros((3, 2), np.int32),
                             qrels={}, earlier={"u": ("a", "b"), "v": ("a", "c", "d", "x")})
  np.testing.assert_array_equal(
      eval_lib.excluded_nodes(trie, ["a", "b", "c", "d"], queries),
      [[2, -1], [1, 3], [-1, -1]])


def test_record_rebuilds_the_run(runs):
  model_dir, _ = runs["retrieval_indexing"]
  record = eval_lib.read_record(model_dir)
  assert record["feature_lengths"] == {"inputs": 32, "targets": 4}
  assert record["id_file"] == os.path.abspath(runs["id_file"])
  config = finetune.t5_config_from_record(record)
  assert config == T5_CONFIG.replace(vocab_size=record["vocab_size"], dtype="float32")
  restored = finetune.settings_from_record(record)
  assert TINY in restored


def test_damaged_record_names_its_file(tmp_path):
  (tmp_path / finetune.INIT_FILE).write_text('{"init": "scratch",\n "task": ')
  with pytest.raises(ValueError, match=rf"{finetune.INIT_FILE}:2: not JSON"):
    eval_lib.read_record(str(tmp_path))


def test_command_line_rebuilds_everything_from_model_dir(runs, tmp_path):
  """A fresh process knows nothing of the tiny corpus: init.json must say it."""
  model_dir, result = runs["retrieval_indexing"]
  out = subprocess.run(
      [sys.executable, "-m", "lmindexer_jax.eval", f"--model_dir={model_dir}", f"--beam={BEAM}",
       f"--output_dir={tmp_path}", "--batch_size=16"],
      cwd=REPO, env=xla_env.env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  again = json.loads((tmp_path / "metrics_test.json").read_text())
  assert again["metrics"] == result["metrics"] and again["invalid_ids"] == 0
  assert (tmp_path / "run_test.trec").read_text() == pathlib.Path(result["run_file"]).read_text()
  assert "recall@1" in out.stdout and "retrieval (test)" in out.stdout


def test_not_a_finetuning_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a fine-tuning run"):
    eval_lib.evaluate(str(tmp_path))
  (tmp_path / finetune.INIT_FILE).write_text(json.dumps({"init": "scratch", "task": "x"}))
  with pytest.raises(ValueError, match="lacks"):
    eval_lib.evaluate(str(tmp_path))


def test_invalid_ids_and_tied_scores():
  ids = semantic_ids.SemanticIds(doc_ids=("a", "b"), codes=np.array([[0, 1], [1, 0]]),
                                 codebook_sizes=(2,), disambiguation_size=2)
  codes = np.array([[[0, 1], [1, 1], [-1, -1]], [[1, 0], [0, 0], [0, 1]]])
  assert eval_lib.count_invalid(codes, ids) == (2, 1)  # (1, 1) and (0, 0); one unfilled
  scores = eval_lib._strictly_decreasing([-1.0, -1.0, -2.0, -2.0])
  assert scores[0] == -1.0 and scores[2] == -2.0
  assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
