"""The main job on a tiny corpus: every task x scheme in results.json, and a rerun resumes."""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmindexer_jax import checkpoints
from lmindexer_jax import experiment
from lmindexer_jax import gin_utils
from lmindexer_jax import indexer
from lmindexer_jax import indexer_manifest
from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import train
from lmindexer_jax import vocabularies
from lmindexer_jax.baselines import id_pipeline
from lmindexer_jax.baselines import rqvae
from tasks import semantic_ids
from tasks import settings
from tasks import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = synthetic.CorpusConfig(
    num_docs=96, branching=(4, 2, 2), words_per_topic=(8, 6, 4), num_users=24, vocab_size=300
)
CODEBOOKS = (4, 4)
INDEX_TASK = "lmindexer.synthetic.index"
T5_CONFIG = t5.T5Config(vocab_size=0, emb_dim=32, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, head_dim=16, mlp_dim=64,
                        mlp_activations=("gelu", "linear"), logits_via_embedding=False)
TASKS = {"retrieval_indexing": 32, "rec": 32}
SCHEMES = ("learned", "rqvae", "atomic")  # random IDs take atomic's path (no vectors)
BUDGET = experiment.FinetuneConfig(train_steps=8, batch_size=16, warmup_steps=2, target_length=4,
                                   log_period=4)


def fake_indexer(calls: list, *, model_dir: str, t5_config: t5.T5Config = T5_CONFIG) -> dict:
  """What the indexer leaves: a last quantized stage (T5 + codebooks), its IDs and manifest.

  The IDs are the planted topic codes of the first two levels (what a perfect indexer finds).
  """
  calls.append(model_dir)
  corpus = synthetic.build(TINY)
  base = synthetic.vocabulary(TINY).vocab_size
  layout = vocabularies.IdLayout(base, CODEBOOKS)
  config = t5_config.replace(vocab_size=layout.vocab_size)
  tokens = jnp.ones((1, 1), jnp.int32)
  t5_params = nn.unbox(t5.Transformer(config).init(
      jax.random.PRNGKey(5), tokens, tokens, enable_dropout=False)["params"])
  rng = np.random.default_rng(0)
  params = {"t5": t5_params, **{f"quantizers_{t}": {"codebook": rng.normal(
      size=(k, config.emb_dim)).astype(np.float32)} for t, k in enumerate(CODEBOOKS)}}
  stage = os.path.join(model_dir, "stages", f"quantized_{len(CODEBOOKS) - 1}", "checkpoints")
  checkpointer = checkpoints.Checkpointer(stage, checkpoints.CheckpointConfig(keep=1))
  checkpointer.save(3, train.TrainState(jnp.asarray(3, jnp.int32), params, ()))
  checkpointer.close()
  planted = corpus.planted_codes[:, :2] % np.array(CODEBOOKS)
  codes, size = semantic_ids.append_disambiguation(planted)
  semantic_ids.write(os.path.join(model_dir, semantic_ids.FILE_NAME), corpus.doc_ids, codes,
                     codebook_sizes=CODEBOOKS, disambiguation_size=size)
  indexer_manifest.write_indexer_manifest(
      model_dir, index_task=INDEX_TASK, t5_config=config,
      config=indexer.IndexerConfig(codebook_sizes=CODEBOOKS), max_length=24,
      base_vocabulary=synthetic.vocabulary(TINY))
  return {}


def _run(model_dir, calls, workers=1, indexer_config=T5_CONFIG, tasks=TASKS,
         learned_init="indexer"):
  make_ids = functools.partial(id_pipeline.make_ids, index_task=INDEX_TASK,
                               codebook_sizes=CODEBOOKS, max_length=24)
  config = rqvae.RqVaeConfig(latent_dim=8, hidden_dims=(32,), num_steps=20, batch_size=64,
                             reset_window=0, kmeans_iters=5)
  return experiment.run(
      model_dir=str(model_dir), index_task=INDEX_TASK,
      indexer=functools.partial(fake_indexer, calls, t5_config=indexer_config),
      id_makers={"rqvae": functools.partial(make_ids, scheme="rqvae", rqvae_config=config),
                 "atomic": functools.partial(make_ids, scheme="atomic")},
      tasks=tasks, t5_config=T5_CONFIG,
      finetune_config=BUDGET,
      task_finetune_configs={"rec": dataclasses.replace(BUDGET, train_steps=12)},
      learned_init=learned_init, beam_size=10, eval_batch_size=32,
      partitioner=partitioning.Partitioner(num_devices=1), compilation_cache=True,
      workers=workers)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("job")
  calls = []
  session_cache = jax.config.jax_compilation_cache_dir
  with settings.configured(TINY):
    # Two worker processes: they read the corpus settings configured here.
    first = _run(model_dir, calls, workers=2)
    # The job's cache was MODEL_DIR/jax_cache while it ran, and is no longer.
    assert (model_dir / "jax_cache").is_dir()
    assert jax.config.jax_compilation_cache_dir == session_cache
    yield model_dir, calls, first


def test_results_have_every_task_and_scheme(job):
  model_dir, calls, results = job
  assert calls == [str(model_dir / "index")]
  on_disk = json.loads((model_dir / experiment.RESULTS_FILE).read_text())
  assert on_disk == results
  assert set(results["tasks"]) == set(TASKS)
  for task in TASKS:
    assert set(results["tasks"][task]) == set(SCHEMES)
    for scheme, entry in results["tasks"][task].items():
      assert entry["invalid_ids"] == 0
      assert entry["init"] == ("indexer" if scheme == "learned" else "scratch")
      for key in ("recall@1", "recall@10", "ndcg@10", "mrr@10"):
        assert 0 <= entry[key] <= 1
      assert "recall@20" not in entry  # beam 10
      assert ("excluding_history" in entry) == (task == "rec")
      assert (model_dir / task / scheme / "run_test.trec").exists()
  # One disambiguation size for all: schemes of the same codebook sizes have one vocabulary
  # (the same model size); atomic IDs a code per document.
  init = {(task, s): json.loads((model_dir / task / s / "init.json").read_text())
          for task in TASKS for s in SCHEMES}
  assert len({entry["disambiguation_size"] for entry in init.values()}) == 1
  assert len({init[task, s]["vocab_size"] for task in TASKS for s in ("learned", "rqvae")}) == 1
  assert {tuple(init[task, "atomic"]["codebook_sizes"]) for task in TASKS} == {(TINY.num_docs,)}
  # rec has its own budget (12 steps), retrieval the shared one (8), for every scheme.
  assert {t: b["train_steps"] for t, b in results["finetune"].items()} == {
      "retrieval_indexing": 8, "rec": 12}
  for task in TASKS:
    for scheme in SCHEMES:
      lines = (model_dir / task / scheme / "metrics.jsonl").read_text().splitlines()
      assert json.loads(lines[-1])["step"] == results["finetune"][task]["train_steps"]
  stats = json.loads((model_dir / "ids" / "rqvae" / "id_stats.json").read_text())
  assert "quantized_1" in stats["vectors"]  # the indexer's own encoder
  table = experiment.results_table(results)
  assert "rec -earlier / rqvae" in table and "retrieval_indexing / learned" in table


def test_rerun_skips_finished_sub_runs(job, capsys):
  model_dir, calls, first = job
  redo = model_dir / "rec" / "rqvae"
  (redo / "metrics_test.json").unlink()
  stamps = {p: p.stat().st_mtime_ns for p in model_dir.glob("*/*/metrics_test.json")}
  trained = (redo / "metrics.jsonl").read_text()
  with settings.configured(TINY):
    again = _run(model_dir, calls)
  out = capsys.readouterr().out
  assert calls == [str(model_dir / "index")]  # not indexed again
  assert out.count("done before, skipped") == 1 + 2 + 5  # index, 2 schemes' IDs, 5 of 6 runs
  assert "resumed from step 12" in out  # the redone run is only evaluated
  assert (redo / "metrics.jsonl").read_text() == trained
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  first = dict(first, seconds_this_call=None)
  assert dict(again, seconds_this_call=None) == first


def test_a_run_trained_here_equals_the_one_trained_in_a_worker(job, capsys):
  model_dir, calls, first = job
  redo = model_dir / "retrieval_indexing" / "learned"

  def losses():
    lines = (redo / "metrics.jsonl").read_text().splitlines()
    return [(row["step"], row["loss"]) for row in map(json.loads, lines)]

  trained = losses()
  shutil.rmtree(redo)
  with settings.configured(TINY):
    again = _run(model_dir, calls, workers=1)
  assert "fine-tune 8 steps from indexer" in capsys.readouterr().out
  assert losses() == trained
  assert dict(again, seconds_this_call=None) == dict(first, seconds_this_call=None)


def test_finetune_dropout_rate_replaces_the_models(job, monkeypatch):
  model_dir, _, _ = job
  rates = []

  def fake_train(*, model, **unused):
    rates.append(model.module.config.dropout_rate)
    return train.TrainState(jnp.asarray(0, jnp.int32), {}, ())

  monkeypatch.setattr(experiment.train, "train", fake_train)
  for rate in (None, 0.3):
    with settings.configured(TINY):
      experiment.finetune_run(
          model_dir=str(model_dir / "unused"), task_name="lmindexer.synthetic.rec",
          id_file=str(model_dir / "index" / semantic_ids.FILE_NAME), t5_config=T5_CONFIG,
          input_length=32, config=experiment.FinetuneConfig(dropout_rate=rate))
  assert rates == [T5_CONFIG.dropout_rate, 0.3]


def test_vector_schemes_use_the_indexers_own_sizes(tmp_path, capsys):
  """An indexer sized apart from the fine-tuning runs (a scoped `index_pipeline.index.t5_config`):
  RQ-VAE encodes with the indexer's sizes, and starting the learned runs from it is refused."""
  wide = T5_CONFIG.replace(emb_dim=48, mlp_dim=96)
  session_cache = jax.config.jax_compilation_cache_dir
  with settings.configured(TINY):
    _run(tmp_path, [], indexer_config=wide, tasks={}, learned_init=None)
    # No tasks here: rec's own budget is unused, and the log says so.
    assert "does not run, ignored: ['rec']" in capsys.readouterr().out
    vectors = np.load(tmp_path / "ids" / "rqvae" / id_pipeline.EMBEDDINGS_FILE)
    assert vectors.shape == (TINY.num_docs, 48)
    with pytest.raises(ValueError, match="do not fit the model"):
      _run(tmp_path, [], indexer_config=wide, tasks={"rec": 32})
  assert jax.config.jax_compilation_cache_dir == session_cache  # Also after an error.


def test_gin_files_parse(monkeypatch):
  """quickstart.gin, compare.gin + ml100k.gin and compare_ml100k.gin bind the job (not run)."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys.modules["__main__"], "train", train.train, raising=False)
  monkeypatch.setattr(sys.modules["__main__"], "run", train.run, raising=False)
  for files in (["gin/quickstart.gin"], ["gin/runs/compare.gin", "gin/data/ml100k.gin"],
                ["gin/runs/compare_ml100k.gin"]):
    gin.clear_config()
    try:
      gin_utils.parse(files, ["MODEL_DIR = '/tmp/x'"], [])
      job = gin.query_parameter("train_script.run.job")
      assert job.selector.endswith("experiment.run")
      tasks = gin.query_parameter("FINETUNE_TASKS/macro.value")
      makers = gin.query_parameter("ID_MAKERS/macro.value")
      if files == ["gin/quickstart.gin"]:
        assert tasks == {"retrieval_indexing": 64, "rec": 64}
        assert set(makers) == {"random", "rqvae"}
        assert gin.query_parameter("rec/experiment.FinetuneConfig.train_steps") == 1000
        assert gin.query_parameter("MODEL_DIR/macro.value") == "/tmp/x"
      elif files == ["gin/runs/compare_ml100k.gin"]:
        # The README's ml100k settings replace the defaults that the other two files give.
        assert tasks == {"rec": 32}
        assert gin.query_parameter("tasks.corpus.RecConfig.max_history") == 3
        assert gin.query_parameter("experiment.FinetuneConfig.train_steps") == 9000
        assert gin.query_parameter("index_model/t5.T5Config.emb_dim") == 64
      else:
        assert tasks == {"rec": 128}
        assert gin.query_parameter("tasks.corpus.RecConfig.max_history") == 20
      if files != ["gin/quickstart.gin"]:
        assert set(makers) == {"random", "atomic", "hkmeans", "rqkmeans", "rqvae"}
        assert gin.query_parameter("INDEX_TASK/macro.value") == "lmindexer.ml100k.index"
    finally:
      gin.clear_config()
