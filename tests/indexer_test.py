"""The indexer's model, its batches, and the pipeline end to end on a tiny corpus."""

import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmindexer_jax import index_pipeline
from lmindexer_jax import indexer
from lmindexer_jax import kmeans
from lmindexer_jax import partitioning
from lmindexer_jax import quantizer
from lmindexer_jax import t5
from lmindexer_jax import vocabularies
from tasks import semantic_ids
from tasks import settings
from tasks import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = vocabularies.IdLayout(base_size=40, codebook_sizes=(4, 3))
T5_CONFIG = t5.T5Config(
    vocab_size=LAYOUT.vocab_size, emb_dim=16, num_heads=2, num_encoder_layers=1,
    num_decoder_layers=1, head_dim=8, mlp_dim=32, mlp_activations=("gelu", "linear"),
    logits_via_embedding=False, dropout_rate=0.1,
)


def _module(**overrides):
  config = indexer.IndexerConfig(codebook_sizes=LAYOUT.codebook_sizes, **overrides)
  return indexer.SemanticIndexer(T5_CONFIG, LAYOUT, config)


def _batch(position: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 40, size=(8, 10)).astype(np.int32)
  tokens[:, -1] = 1  # EOS
  tokens[:4, -3:] = 0
  batch = {"encoder_input_tokens": tokens}
  if position:
    batch.update(
        prefix_codes=rng.integers(0, 4, size=(8, position)).astype(np.int32),
        negative_tokens=tokens[rng.integers(0, 8, size=(8, 4))],
        negative_mask=np.array([[True] * 4] * 6 + [[False] * 4] * 2),
    )
  return batch


@pytest.mark.parametrize("stage", [
    indexer.Stage(0, use_codebook=False, freeze_t5=True),
    indexer.Stage(0, use_codebook=True),
    indexer.Stage(1, use_codebook=True),
])
def test_loss_terms_per_stage(stage):
  model = indexer.IndexerModel(_module(), stage)
  batch = _batch(stage.position)
  params = model.init_params(jax.random.PRNGKey(0), batch)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, jax.random.PRNGKey(1))
  assert np.isfinite(loss)
  assert "reconstruction_loss" in metrics
  assert ("contrastive_loss" in metrics) == (not stage.freeze_t5 and stage.position == 0)
  assert ("prefix_contrastive_rows_used" in metrics) == (stage.position > 0)
  assert ("commitment_loss" in metrics) == (stage.position > 0)
  if stage.position:
    assert float(metrics["prefix_contrastive_rows_used"]) == pytest.approx(6 / 8)
  t5_grad = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["t5"]))
  recon_grad = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["reconstructor"]))
  assert recon_grad > 0
  assert (t5_grad == 0) == stage.freeze_t5
  codebook_grad = float(jnp.abs(grads["quantizers_0"]["codebook"]).sum())
  assert (codebook_grad > 0) == (stage.use_codebook and stage.position == 0)


def test_ablation_weights_switch_terms_off():
  model = indexer.IndexerModel(
      _module(contrastive_weight=0.0, commitment_weight=0.0), indexer.Stage(1, True))
  batch = _batch(1)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                        model.init_params(jax.random.PRNGKey(0), batch),
                        is_leaf=lambda x: hasattr(x, "unbox"))
  loss, metrics = jax.jit(model.loss_fn)(params, batch, jax.random.PRNGKey(1))
  assert set(metrics) & {"contrastive_loss", "commitment_loss"} == set()
  assert float(loss) == pytest.approx(float(metrics["reconstruction_loss"]))


@pytest.mark.parametrize("position", [0, 1])
def test_contrastive_weight_per_position(position):
  """(position 1, later) weights: in-batch contrastive off at t = 0, same-prefix on after."""
  module = _module(contrastive_weight=(0.0, 0.5), commitment_weight=0.0)
  model = indexer.IndexerModel(module, indexer.Stage(position, True))
  batch = _batch(position)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                        model.init_params(jax.random.PRNGKey(0), batch),
                        is_leaf=lambda x: hasattr(x, "unbox"))
  loss, metrics = jax.jit(model.loss_fn)(params, batch, jax.random.PRNGKey(1))
  assert "contrastive_loss" not in metrics
  assert ("prefix_contrastive_loss" in metrics) == (position == 1)
  contrastive = float(metrics.get("prefix_contrastive_loss", 0.0))
  assert float(loss) == pytest.approx(float(metrics["reconstruction_loss"]) + 0.5 * contrastive,
                                      rel=1e-5)
  assert module.config.contrastive_weight_at(0) == 0.0
  assert module.config.contrastive_weight_at(3) == 0.5


def test_evaluation_mask_seed_fixes_a_training_ratio_mask():
  """Evaluation (no rng) shows every other token unless `eval_mask_seed` samples the training
  mask: then two calls agree with each other and not with the all-visible mask."""
  batch = _batch(0)
  stage = indexer.Stage(0, use_codebook=True)
  module = _module(mask_ratios=(0.9, 0.9))
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                        indexer.IndexerModel(module, stage).init_params(jax.random.PRNGKey(0),
                                                                        batch),
                        is_leaf=lambda x: hasattr(x, "unbox"))

  def loss(seed):
    return float(indexer.IndexerModel(module, stage, eval_mask_seed=seed).loss_fn(
        params, batch, None)[0])

  assert loss(0) == loss(0)
  assert loss(0) != pytest.approx(loss(None), rel=1e-4)


def test_trained_t5_is_the_indexer():
  """After copying E_t into the ID-token embeddings, the LM's greedy choice among position t's
  tokens is the quantizer's code."""
  module = _module()
  batch = _batch(1)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                        module.init({"params": jax.random.PRNGKey(0)},
                                    batch["encoder_input_tokens"], batch["prefix_codes"])["params"],
                        is_leaf=lambda x: hasattr(x, "unbox"))
  params = jax.tree.map(np.asarray, params)
  codebook = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
  params["quantizers_1"]["codebook"] = codebook
  params = index_pipeline.copy_codebook_into_vocabulary(params, codebook, LAYOUT, 1)
  tokens, prefix = batch["encoder_input_tokens"], batch["prefix_codes"]
  h, _ = module.apply({"params": params}, tokens, prefix, enable_dropout=False,
                      method=indexer.SemanticIndexer.represent)
  codes = np.argmax(np.asarray(h) @ codebook.T, axis=-1)
  decoder = np.concatenate([np.zeros((8, 1), np.int32), prefix + LAYOUT.position_starts[0]], 1)
  logits = module.apply({"params": params}, tokens, decoder,
                        method=lambda m, x, d: m.t5(x, d, enable_dropout=False))
  start, end = LAYOUT.position_range(1)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits)[:, -1, start:end], -1), codes)


def test_document_batches_resume_and_negatives(tmp_path):
  tokens = np.arange(40 * 3, dtype=np.int32).reshape(40, 3)
  prefix = (np.arange(40) % 5)[:, None].astype(np.int32)
  batches = index_pipeline.DocumentBatches(tokens, 8, seed=3, prefix_codes_NxP=prefix,
                                           num_negatives=4)
  seen = [next(batches) for _ in range(3)]
  batches.save(str(tmp_path))
  after = [next(batches) for _ in range(4)]  # Crosses into the next epoch.
  resumed = index_pipeline.DocumentBatches(tokens, 8, seed=3, prefix_codes_NxP=prefix,
                                           num_negatives=4)
  resumed.restore(str(tmp_path))
  for a, b in zip(after, [next(resumed) for _ in range(4)], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # An epoch visits every document once; negatives share the prefix and are never the doc.
  epoch = np.concatenate([b["encoder_input_tokens"][:, 0] // 3 for b in seen + after[:2]])
  assert sorted(epoch) == list(range(40))
  for b in seen:
    docs = b["encoder_input_tokens"][:, 0] // 3
    negs = b["negative_tokens"][:, :, 0] // 3
    assert (negs % 5 == (docs % 5)[:, None]).all()
    assert (negs != docs[:, None]).all()
    assert b["negative_mask"].all()


_TINY = synthetic.CorpusConfig(num_docs=96, branching=(2, 2, 2), vocab_size=200, num_users=8)
_SCHEDULE = index_pipeline.Schedule(batch_size=16, warmup_steps=3, nocode_steps=6,
                                    quantized_steps=6, kmeans_restarts=1, kmeans_iters=10,
                                    eval_batch_size=32, checkpoint_period=2, log_period=1)
_INDEX_GIN = [
    "--gin_file=gin/runs/index.gin", "--gin_file=gin/data/synthetic.gin",
    "--gin.tasks.synthetic.CorpusConfig.num_docs=96",
    "--gin.tasks.synthetic.CorpusConfig.branching=(2, 2, 2)",
    "--gin.tasks.synthetic.CorpusConfig.vocab_size=200",
    "--gin.tasks.synthetic.CorpusConfig.num_users=8",
    "--gin.CODEBOOK_SIZES=(2, 2)", "--gin.MAX_LENGTH=24",
    "--gin.index_pipeline.Schedule.batch_size=16",
    "--gin.index_pipeline.Schedule.warmup_steps=3",
    "--gin.index_pipeline.Schedule.nocode_steps=6",
    "--gin.index_pipeline.Schedule.quantized_steps=6",
    "--gin.index_pipeline.Schedule.kmeans_restarts=1",
    "--gin.index_pipeline.Schedule.kmeans_iters=10",
    "--gin.index_pipeline.Schedule.eval_batch_size=32",
    "--gin.index_pipeline.Schedule.checkpoint_period=2",
    "--gin.index_pipeline.Schedule.log_period=1",
    # synthetic.gin's 1e-2 is for 800-step stages; six steps of it collapse this tiny run's codes.
    "--gin.index_pipeline.Schedule.learning_rate=2e-3",
]


def _index_command(model_dir):
  return [sys.executable, "-m", "lmindexer_jax.train", *_INDEX_GIN,
          f"--gin.MODEL_DIR='{model_dir}'"]


def _env():
  return dict(os.environ, XLA_FLAGS="")


def run_straight_index(model_dir):
  """The tiny pipeline run, once per session (`straight_index` in conftest.py)."""
  result = subprocess.run(_index_command(model_dir), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return model_dir


def test_pipeline_writes_unique_ids_and_stats(straight_index):
  ids = semantic_ids.read(str(straight_index / "semantic_ids.tsv"))
  assert len(ids.doc_ids) == 96 and ids.num_collisions() == 0
  stats = __import__("json").loads((straight_index / "index_stats.json").read_text())
  assert stats["unique"] and len(stats["positions"]) == 2
  for position in stats["positions"]:
    for key in ("codes_used", "usage_perplexity", "max_group_size", "mean_group_size",
                "collision_rate", "ami", "recon_accuracy", "recon_loss"):
      assert key in position
    assert 0 <= position["recon_accuracy"] <= 1 and position["recon_loss"] > 0
    assert set(position["ami"]) == {"level_1", "level_2", "level_3"}
    assert set(position["kmeans_ami"]) == {"level_1", "level_2", "level_3"}
  assert set(stats["kmeans_baseline_ami"]) == {"level_1", "level_2", "level_3"}
  assert stats["disambiguation_size"] == stats["positions"][-1]["max_group_size"]


def test_resume_after_kill_mid_stage_gives_the_same_ids(straight_index, tmp_path):
  model_dir = tmp_path / "killed"
  proc = subprocess.Popen(_index_command(model_dir), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  stage = None
  for line in proc.stdout:
    if line.startswith("[index] stage "):
      stage = line.split()[2].rstrip(":")
    # Kill inside the second position's quantized stage, once a checkpoint there is on disk
    # (orbax saves asynchronously).
    checkpoints = model_dir / "stages" / "quantized_1" / "checkpoints"
    match = re.match(r"\[train\] step (\d+)/", line)
    if (stage == "quantized_1" and match and checkpoints.exists()
        and any(p.name.isdigit() for p in checkpoints.iterdir())):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert not (model_dir / "semantic_ids.tsv").exists()
  result = subprocess.run(_index_command(model_dir), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step" in result.stdout
  assert "stage warmup" not in result.stdout  # Finished stages are not run again.
  assert (model_dir / "semantic_ids.tsv").read_text() == (
      straight_index / "semantic_ids.tsv").read_text()


def test_eight_device_mesh_gives_the_same_ids(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  kwargs = dict(index_task="lmindexer.synthetic.index",
                t5_config=T5_CONFIG.replace(vocab_size=0, dropout_rate=0.1),
                config=indexer.IndexerConfig(codebook_sizes=(2, 2)), schedule=_SCHEDULE,
                max_length=24)
  with settings.configured(_TINY):
    single = index_pipeline.index(model_dir=str(tmp_path / "one"),
                                  partitioner=partitioning.Partitioner(num_devices=1), **kwargs)
    mesh = index_pipeline.index(model_dir=str(tmp_path / "mesh"),
                                partitioner=partitioning.Partitioner(num_partitions=2), **kwargs)
  assert (tmp_path / "one" / "semantic_ids.tsv").read_text() == (
      tmp_path / "mesh" / "semantic_ids.tsv").read_text()
  # The reconstruction loss is a float mean, summed in another order across 8 devices.
  for one, many in zip(single["positions"], mesh["positions"], strict=True):
    assert one.pop("recon_loss") == pytest.approx(many.pop("recon_loss"), rel=1e-5)
  assert single["positions"] == mesh["positions"]


def test_codebook_from_centers_keeps_the_kmeans_assignment():
  """Equal-norm codewords: the quantizer's argmax h.E is the spherical k-means assignment."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 8)) * np.array([[0.2], [1.0], [5.0], [25.0]])
  h_NxD = (centres[rng.integers(0, 4, 400)] + 0.3 * rng.normal(size=(400, 8))).astype(np.float32)
  result = kmeans.kmeans(h_NxD, 4, rng=jax.random.PRNGKey(0), distance="cosine")
  codebook_KxD = index_pipeline.codebook_from_centers(np.asarray(result.centers_KxD), h_NxD)
  codes_N = np.asarray(quantizer.straight_through_quantize(h_NxD, codebook_KxD).codes_B)
  np.testing.assert_array_equal(codes_N, np.asarray(result.assignments_N))
  np.testing.assert_allclose(np.linalg.norm(codebook_KxD, axis=1),
                             np.linalg.norm(h_NxD, axis=1).mean(), rtol=1e-5)
