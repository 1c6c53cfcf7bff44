"""The indexer's model, its batches, and the pipeline end to end on a tiny corpus."""

import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import xla_env

from lmindexer_jax import assign
from lmindexer_jax import checkpoint_import
from lmindexer_jax import index_pipeline
from lmindexer_jax import indexer
from lmindexer_jax import indexer_manifest
from lmindexer_jax import kmeans
from lmindexer_jax import losses
from lmindexer_jax import metrics
from lmindexer_jax import models
from lmindexer_jax import partitioning
from lmindexer_jax import quantizer
from lmindexer_jax import reconstructor
from lmindexer_jax import t5
from lmindexer_jax import train
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
    # Rows 0-5 have same-prefix siblings in the batch, rows 6 and 7 none.
    prefix = np.array([0, 0, 1, 1, 1, 1, 2, 3], np.int32)
    batch["prefix_codes"] = np.stack([prefix] + [np.zeros(8, np.int32)] * (position - 1), 1)
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


@pytest.mark.parametrize("stage", [
    indexer.Stage(0, use_codebook=False),
    indexer.Stage(0, use_codebook=True),
    indexer.Stage(1, use_codebook=True, joint=True),
])
@pytest.mark.parametrize("reconstruction_weight", [1.0, 0.0])
def test_code_commitment_is_added_wherever_the_quantizer_runs(stage, reconstruction_weight):
  """The weighted pull towards the k-means code, per quantized position; none without one.
  Also in the "no reconstructor" ablation, where it alone trains the codebook."""
  module = _module(contrastive_weight=0.0, commitment_weight=0.0, code_commitment_weight=0.5,
                   reconstruction_weight=reconstruction_weight)
  model = indexer.IndexerModel(module, stage)
  targets = np.arange(8, dtype=np.int32) % 4
  batch = {"encoder_input_tokens": _batch(0)["encoder_input_tokens"], "code_targets": targets}
  params = _unboxed_params(model, batch)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, jax.random.PRNGKey(1))
  names = (["code_commitment_loss_1", "code_commitment_loss_2"] if stage.joint
           else ["code_commitment_loss"] * stage.use_codebook)
  assert {name for name in metrics if name.startswith("code_commitment")} == set(names)
  # The term itself: the quantizer's logits on the k-means codes (the joint ablation has none:
  # its own argmax).
  if not stage.joint and stage.use_codebook:
    h, _ = module.apply(indexer.variables(params), batch["encoder_input_tokens"],
                        np.zeros((8, 0), np.int32), enable_dropout=True,
                        rngs={"dropout": jax.random.split(jax.random.PRNGKey(1), 5)[0]},
                        method=indexer.SemanticIndexer.represent)
    logits = h @ params["quantizers_0"]["codebook"].T
    expected, _ = losses.code_commitment_loss(logits, targets)
    np.testing.assert_allclose(metrics["code_commitment_loss"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="code_targets"):
      model.loss_fn(params, {"encoder_input_tokens": batch["encoder_input_tokens"]},
                    jax.random.PRNGKey(1))
  assert ("reconstruction_loss" in metrics) == bool(reconstruction_weight)
  expected = float(metrics.get("reconstruction_loss", 0.0)) + 0.5 * sum(
      float(metrics[name]) for name in names)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  if not stage.joint:
    codebook_grad = float(jnp.abs(grads["quantizers_0"]["codebook"]).sum())
    assert (codebook_grad > 0) == stage.use_codebook
  # Evaluation (no rng) leaves it out, and needs no targets.
  _, metrics = model.loss_fn(params, {"encoder_input_tokens": batch["encoder_input_tokens"]},
                             None)
  assert not any(name.startswith("code_commitment") for name in metrics)


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


def test_document_batches_resume_and_siblings(tmp_path):
  tokens = np.arange(40 * 3, dtype=np.int32).reshape(40, 3)
  prefix = (np.arange(40) % 5)[:, None].astype(np.int32)
  targets = (np.arange(40) % 7).astype(np.int32)
  batches = index_pipeline.DocumentBatches(tokens, 8, seed=3, prefix_codes_NxP=prefix,
                                           num_negatives=3, code_targets_N=targets)
  assert batches.element_spec["code_targets"].shape == (8,)
  assert batches.element_spec["prefix_codes"].shape == (8, 1)
  seen = [next(batches) for _ in range(3)]
  batches.save(str(tmp_path))
  after = [next(batches) for _ in range(4)]  # Crosses into the next epoch.
  resumed = index_pipeline.DocumentBatches(tokens, 8, seed=3, prefix_codes_NxP=prefix,
                                           num_negatives=3, code_targets_N=targets)
  resumed.restore(str(tmp_path))
  for a, b in zip(after, [next(resumed) for _ in range(4)], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # An epoch visits every document once. Siblings (same doc % 5; 8 per group) come in runs of
  # num_negatives + 1 = 4, which batches of 8 never split: each row has 3 in its batch.
  epoch = [b["encoder_input_tokens"][:, 0] // 3 for b in seen + after[:2]]
  assert sorted(np.concatenate(epoch)) == list(range(40))
  for docs, b in zip(epoch, seen + after[:2], strict=True):
    np.testing.assert_array_equal(b["prefix_codes"][:, 0], docs % 5)
    np.testing.assert_array_equal(b["code_targets"], targets[docs])
    siblings_B = np.sum(docs[:, None] % 5 == docs[None] % 5, axis=1) - 1
    assert (siblings_B >= 3).all()
  # Without prefixes (position 1) the order is a plain shuffle and batches hold tokens only.
  plain = next(index_pipeline.DocumentBatches(tokens, 8, seed=3))
  assert set(plain) == {"encoder_input_tokens"}


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
  return xla_env.env()


def run_straight_index(model_dir):
  """The tiny pipeline run, once per session (`straight_index` in conftest.py)."""
  result = subprocess.run(_index_command(model_dir), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return model_dir


def test_pipeline_writes_unique_ids_and_stats(straight_index):
  ids = semantic_ids.read(str(straight_index / "semantic_ids.tsv"))
  assert len(ids.doc_ids) == 96 and ids.num_collisions() == 0
  stats = json.loads((straight_index / "index_stats.json").read_text())
  assert stats["unique"] and len(stats["positions"]) == 2
  for position in stats["positions"]:
    for key in ("codes_used", "usage_perplexity", "max_group_size", "mean_group_size",
                "collision_rate", "ami", "recon_accuracy", "recon_loss"):
      assert key in position
    assert 0 <= position["recon_accuracy"] <= 1 and position["recon_loss"] > 0
    assert set(position["ami"]) == {"level_1", "level_2", "level_3"}
    assert set(position["kmeans_ami"]) == set(position["start_ami"]) == {
        "level_1", "level_2", "level_3"}
  assert set(stats["kmeans_baseline_ami"]) == {"level_1", "level_2", "level_3"}
  assert stats["disambiguation_size"] == stats["positions"][-1]["max_group_size"]
  # The last codebook was copied into the final T5 after the codes were assigned with it.
  agreement = stats["greedy_agreement"]
  assert len(agreement) == 2 and agreement[-1] == 1.0 and 0 <= agreement[0] <= 1
  assert stats["t5_init"] == "scratch"


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


def test_eight_device_mesh_gives_the_same_ids(straight_index, tmp_path):
  """The same command on 8 simulated devices (4-way data x 2-way model parallel) gives the
  single-device run's IDs and stats."""
  model_dir = tmp_path / "mesh"
  env = xla_env.env(num_devices=8)
  result = subprocess.run(
      [*_index_command(model_dir), "--gin.partitioning.Partitioner.num_partitions=2"], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert (model_dir / "semantic_ids.tsv").read_text() == (
      straight_index / "semantic_ids.tsv").read_text()
  single, mesh = (json.loads((d / "index_stats.json").read_text())
                  for d in (straight_index, model_dir))
  # The reconstruction metrics come from parameters trained with gradients summed in another
  # order across 8 devices: they differ in the last bits, and after hundreds of steps the loss
  # in its fourth digit (1.7e-4 relative seen). The IDs and every statistic of the codes agree.
  # So can the final T5's greedy choice of a document near a tie (one document is 1/96).
  for one, many in zip(single["positions"], mesh["positions"], strict=True):
    assert one.pop("recon_loss") == pytest.approx(many.pop("recon_loss"), rel=1e-3)
    assert one.pop("recon_accuracy") == pytest.approx(many.pop("recon_accuracy"), abs=1e-3)
  assert single.pop("greedy_agreement") == pytest.approx(mesh.pop("greedy_agreement"),
                                                         abs=1.5 / 96)
  assert single == mesh


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


def _init_params(module, batch):
  variables = module.init({"params": jax.random.PRNGKey(0)}, batch["encoder_input_tokens"],
                          batch["prefix_codes"])
  return jax.tree.map(np.asarray, nn.unbox(variables["params"]))


@pytest.mark.parametrize("position", [0, 1])
def test_id_token_distribution_is_the_reconstruction_from_the_id_alone(position):
  """A row that sees no document token: the reconstructor's rows under a mask hiding every
  document key (mask ratio 1) all equal it."""
  module = _module()
  batch = _batch(1)
  tokens, prefix = batch["encoder_input_tokens"], batch["prefix_codes"][:, :position]
  params = _init_params(module, batch)
  variables = {"params": params}
  probs_BxV, h_BxD = module.apply(variables, tokens, prefix,
                                  method=indexer.SemanticIndexer.id_token_distribution)
  probs_BxV = np.asarray(probs_BxV)
  np.testing.assert_allclose(probs_BxV.sum(-1), 1.0, rtol=1e-5)
  represented_BxD, _ = module.apply(variables, tokens, prefix, enable_dropout=False,
                                    method=indexer.SemanticIndexer.represent)
  np.testing.assert_allclose(h_BxD, represented_BxD, rtol=1e-6)
  hidden_mask = reconstructor.sample_reconstruction_mask(
      jax.random.PRNGKey(0), tokens, position + 1, 1.0)
  rows_BxLxD = module.apply(variables, h_BxD, prefix, tokens, hidden_mask, enable_dropout=False,
                            method=indexer.SemanticIndexer.reconstruct)
  head_DxV = module.apply(variables, method=indexer.SemanticIndexer.lm_head)
  row_probs_BxLxV = jax.nn.softmax(np.asarray(rows_BxLxD) @ np.asarray(head_DxV), axis=-1)
  # Row 0 exactly; later rows differ only by the slots' relative-position bias (one slot: none).
  np.testing.assert_allclose(row_probs_BxLxV[:, 0], probs_BxV, rtol=1e-4, atol=1e-7)
  if position == 0:
    np.testing.assert_allclose(row_probs_BxLxV, np.broadcast_to(
        probs_BxV[:, None], row_probs_BxLxV.shape), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("features", index_pipeline.KMEANS_FEATURES)
def test_initial_codebook_gives_its_clusters_through_the_quantizer(features):
  """k-means on h_t or on the decoded features; either way E_t sits at h_t's mean norm and
  argmax h_t.E_t gives (nearly all of) the k-means clusters."""
  module = _module(quantizer_normalize=False)
  batch = _batch(1)
  params = _init_params(module, batch)
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, 40, size=(64, 10)).astype(np.int32)
  prefix = rng.integers(0, 4, size=(64, 1)).astype(np.int32)
  schedule = index_pipeline.Schedule(kmeans_features=features, kmeans_restarts=2,
                                     kmeans_feature_dim=16, eval_batch_size=32)
  partitioner = partitioning.Partitioner(num_devices=1)
  init = index_pipeline.initial_codebook(
      module, params, 1, tokens, prefix, schedule, partitioner, seed=0)
  codebook_KxD, codes_N = init.codebook_KxD, init.start_codes_N
  assert codebook_KxD.shape == (3, 16)
  h_NxD = index_pipeline.encode_corpus(module, params, tokens, prefix, partitioner, 32)
  np.testing.assert_allclose(np.linalg.norm(codebook_KxD, axis=1).mean(),
                             np.linalg.norm(h_NxD, axis=1).mean(), rtol=1e-4)
  np.testing.assert_array_equal(codes_N, np.argmax(h_NxD @ codebook_KxD.T, axis=1))
  if features == "decoded":
    decoded_h_NxD, features_NxF = index_pipeline.decoded_features(
        module, params, tokens, prefix, partitioner, 32, feature_dim=16, seed=1)
    np.testing.assert_allclose(decoded_h_NxD, h_NxD, rtol=1e-5, atol=1e-6)
    assert features_NxF.shape == (64, 16)  # projected: V = 47 > 16
    # Position 2 clusters what differs within each prefix group.
    means_GxF = np.stack([features_NxF[prefix[:, 0] == g].mean(0) for g in range(4)])
    points = features_NxF - means_GxF[prefix[:, 0]]
  else:
    points = h_NxD
  clusters = kmeans.kmeans(points, 3, rng=jax.random.PRNGKey(1), num_iters=100, num_restarts=2,
                           distance="l2" if features == "decoded" else "cosine").assignments_N
  assert metrics.ami(np.asarray(clusters), codes_N) > 0.8
  assert metrics.ami(np.asarray(clusters), init.kmeans_codes_N) > 0.99


def test_kmeans_within_groups_numbers_each_groups_clusters_by_the_shared_directions():
  """Each group's own clusters, numbered alike across groups; a small group gets one code per
  row."""
  rng = np.random.default_rng(0)
  directions_KxF = 10.0 * np.eye(3, 6)
  rows, groups, truth = [], [], []
  for g, size in enumerate([60, 45, 2]):
    offset_F = rng.normal(size=6) * 30.0  # The group's own mean, far from the others'.
    k_M = rng.integers(0, 3, size) if size > 3 else np.arange(size)
    rows.append(offset_F + directions_KxF[k_M] + rng.normal(size=(size, 6)) * 0.5)
    groups.append(np.full(size, g))
    truth.append(k_M)
  features_NxF = np.concatenate(rows).astype(np.float32)
  group_N, truth_N = np.concatenate(groups), np.concatenate(truth)
  # Residuals, as the pipeline gives: less each group's mean.
  for g in range(3):
    features_NxF[group_N == g] -= features_NxF[group_N == g].mean(0)
  codes_N, inertia = index_pipeline.kmeans_within_groups(
      features_NxF, group_N, 3, rng=jax.random.PRNGKey(0), num_iters=50, num_restarts=2)
  assert inertia > 0
  # One bijection from the planted directions to codes, the same in every group.
  mapping = {int(t): int(c)
             for t, c in zip(truth_N[group_N < 2], codes_N[group_N < 2], strict=True)}
  assert sorted(mapping.values()) == [0, 1, 2]
  np.testing.assert_array_equal(codes_N[group_N < 2],
                                [mapping[int(t)] for t in truth_N[group_N < 2]])
  np.testing.assert_array_equal(codes_N[group_N == 2], [mapping[0], mapping[1]])


def test_decoded_features_are_hellinger_coordinates():
  """Without projection, rows are sqrt of distributions: unit norm, and their distance is
  sqrt(2) x the Hellinger distance."""
  module = _module()
  batch = _batch(1)
  params = _init_params(module, batch)
  tokens, prefix = batch["encoder_input_tokens"], batch["prefix_codes"]
  partitioner = partitioning.Partitioner(num_devices=1)
  _, features_NxV = index_pipeline.decoded_features(module, params, tokens, prefix, partitioner,
                                                    8, feature_dim=256, seed=0)
  probs_NxV = np.asarray(module.apply({"params": params}, tokens, prefix,
                                      method=indexer.SemanticIndexer.id_token_distribution)[0])
  np.testing.assert_allclose(features_NxV, np.sqrt(probs_NxV), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(features_NxV, axis=1), 1.0, rtol=1e-5)


def _unboxed_params(model, batch):
  return jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                      model.init_params(jax.random.PRNGKey(0), batch),
                      is_leaf=lambda x: hasattr(x, "unbox"))


def test_joint_loss_trains_every_position_through_tied_codebooks():
  """All positions at once: reconstruction reads every quantized h_t, contrastive runs per
  position (same-prefix rows at t > 1), and gradients reach the ID-token embeddings (the tied
  codebooks), not the unused quantizer parameters."""
  module = _module(commitment_weight=1.0)
  model = indexer.IndexerModel(module, indexer.Stage(1, use_codebook=True, joint=True))
  batch = {"encoder_input_tokens": _batch(0)["encoder_input_tokens"]}
  params = _unboxed_params(model, batch)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, jax.random.PRNGKey(1))
  assert np.isfinite(loss)
  assert {"reconstruction_loss", "contrastive_loss_1", "contrastive_loss_2",
          "codes_used_in_batch_1", "codes_used_in_batch_2"} <= set(metrics)
  assert "commitment_loss" not in metrics
  embedding_grad = np.abs(np.asarray(grads["t5"]["token_embedder"]["embedding"]))
  for t in range(2):
    start, end = LAYOUT.position_range(t)
    assert embedding_grad[start:end].sum() > 0
    assert float(jnp.abs(grads[f"quantizers_{t}"]["codebook"]).sum()) == 0


def test_joint_codes_are_the_tied_lms_greedy_codes():
  """`represent_all`'s codes are the LM's greedy choice among each position's tokens once
  `tie_codebooks` has copied the embeddings into the (untied) head and the quantizers."""
  module = _module()
  tokens = _batch(0)["encoder_input_tokens"]
  model = indexer.IndexerModel(module, indexer.Stage(1, use_codebook=True, joint=True))
  params = jax.tree.map(np.asarray, _unboxed_params(model, {"encoder_input_tokens": tokens}))
  params = index_pipeline.tie_codebooks(params, LAYOUT)
  _, codes = module.apply({"params": params}, tokens, enable_dropout=False,
                          method=indexer.SemanticIndexer.represent_all)
  decoder = np.zeros((8, 1), np.int32)
  for t in range(2):
    logits = module.apply({"params": params}, tokens, decoder,
                          method=lambda m, x, d: m.t5(x, d, enable_dropout=False))
    start, end = LAYOUT.position_range(t)
    greedy = np.argmax(np.asarray(logits)[:, -1, start:end], -1)
    np.testing.assert_array_equal(greedy, np.asarray(codes)[:, t])
    codebook = np.asarray(params[f"quantizers_{t}"]["codebook"])
    np.testing.assert_array_equal(
        index_pipeline.assign_position(module, params, t, tokens, decoder[:, 1:] - np.asarray(
            LAYOUT.position_starts[:t]), partitioning.Partitioner(num_devices=1), 8),
        greedy)
    assert codebook.shape == (LAYOUT.codebook_sizes[t], 16)
    decoder = np.concatenate([decoder, greedy[:, None] + start], axis=1).astype(np.int32)


def _index_tiny_corpus(tmp_path, schedule, **config):
  """The pipeline on the tiny corpus with two 2-code positions, in `tmp_path`."""
  with settings.configured(_TINY):
    return index_pipeline.index(
        model_dir=str(tmp_path), index_task="lmindexer.synthetic.index",
        t5_config=T5_CONFIG.replace(vocab_size=0), schedule=schedule, max_length=24,
        config=indexer.IndexerConfig(codebook_sizes=(2, 2), **config),
        partitioner=partitioning.Partitioner(num_devices=1))


def test_pipeline_starts_from_a_hugging_face_t5(tmp_path):
  """`hf_dir`: the warm-up stage (T5 frozen) keeps the folder's T5 as it is, code-token rows
  appended; the reconstructor trains from scratch."""
  import torch  # noqa: PLC0415 (only this test needs PyTorch)
  import transformers  # noqa: PLC0415

  torch.manual_seed(0)
  hf_config = transformers.T5Config(
      vocab_size=200, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  transformers.T5ForConditionalGeneration(hf_config).save_pretrained(str(tmp_path / "hf"))
  schedule = dataclasses.replace(_SCHEDULE, warmup_steps=2, nocode_steps=2, quantized_steps=2)
  with settings.configured(_TINY):
    stats = index_pipeline.index(
        model_dir=str(tmp_path / "run"), index_task="lmindexer.synthetic.index",
        t5_config=T5_CONFIG.replace(vocab_size=0), schedule=schedule, max_length=24,
        config=indexer.IndexerConfig(codebook_sizes=(2,)), hf_dir=str(tmp_path / "hf"),
        partitioner=partitioning.Partitioner(num_devices=1))
  assert stats["t5_init"] == str(tmp_path / "hf") and stats["unique"]
  _, hf_params = checkpoint_import.load_checkpoint(str(tmp_path / "hf"))
  warm = index_pipeline.final_params(str(tmp_path / "run" / "stages" / "warmup"))
  # The corpus's 300 pieces and 2 code tokens; rows past the folder's 200 are fresh.
  assert warm["t5"]["token_embedder"]["embedding"].shape[0] == 300 + 2
  warm_t5 = dict(warm["t5"], token_embedder={
      "embedding": warm["t5"]["token_embedder"]["embedding"][:200]},
                 logits_dense={"kernel": warm["t5"]["logits_dense"]["kernel"][:, :200]})
  jax.tree.map(np.testing.assert_array_equal, warm_t5, jax.tree.map(np.asarray, hf_params))


def test_all_positions_at_once_ablation(tmp_path):
  """`Schedule.progressive=False`: k-means codebooks position by position on the warm-up model,
  one joint stage, unique IDs; `assign` (through the manifest) gives back the same codes."""
  schedule = dataclasses.replace(_SCHEDULE, progressive=False, joint_steps=4)
  stats = _index_tiny_corpus(tmp_path, schedule)
  with settings.configured(_TINY):
    corpus = index_pipeline.load_corpus("lmindexer.synthetic.index", 24)
  assert stats["unique"] and not stats["progressive"]
  assert not (tmp_path / "stages" / "nocode_0" / "metrics.jsonl").exists()  # no steps there
  assert (tmp_path / "stages" / "joint" / "metrics.jsonl").exists()
  manifest = indexer_manifest.read_indexer_manifest(str(tmp_path))
  assert manifest.position_stages == ("joint_final", "joint_final")
  ids = semantic_ids.read(str(tmp_path / "semantic_ids.tsv"))
  np.testing.assert_array_equal(
      assign.assign_codes(manifest, corpus.tokens_NxL, partitioning.Partitioner(num_devices=1)),
      ids.codes[:, :2])


def test_ema_quantizer_stage_updates_its_codebook_by_ema():
  """`quantizer_kind='ema_vq'`: the codebook statistics sit in params without gradient, and one
  train step sets them to the EMA update of that batch's (pre-step) representations."""
  config = indexer.IndexerConfig(codebook_sizes=LAYOUT.codebook_sizes, quantizer_kind="ema_vq",
                                 ema_decay=0.9)
  module = indexer.SemanticIndexer(T5_CONFIG.replace(dropout_rate=0.0), LAYOUT, config)
  model = indexer.IndexerModel(module, indexer.Stage(0, use_codebook=True))
  batch = {"encoder_input_tokens": _batch(0)["encoder_input_tokens"]}
  params = _unboxed_params(model, batch)
  assert set(params["quantizers_0"]) == {"codebook", "cluster_size", "embed_sum"}
  (_, metrics), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, jax.random.PRNGKey(1))
  assert "vq_commitment_loss" in metrics
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["quantizers_0"]))
  h_BxD, _ = module.apply(indexer.variables(params), batch["encoder_input_tokens"],
                          np.zeros((8, 0), np.int32), enable_dropout=False,
                          method=indexer.SemanticIndexer.represent)
  old = params["quantizers_0"]
  codes_B = quantizer.nearest_codeword_quantize(h_BxD, old["codebook"]).codes_B
  expected = quantizer.ema_codebook_update(h_BxD, codes_B, old["codebook"],
                                           old["cluster_size"], old["embed_sum"], decay=0.9,
                                           epsilon=1e-5)
  tx = optax.adamw(1e-2)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  state, metrics = jax.jit(functools.partial(train.train_step, model=model, tx=tx))(
      state, batch, jax.random.PRNGKey(1))
  assert models.STATE_UPDATES not in metrics
  for name, value in zip(("codebook", "cluster_size", "embed_sum"), expected, strict=True):
    np.testing.assert_allclose(state.params["quantizers_0"][name], value, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(state.params["reconstructor"]["final_norm"]["scale"]
                       - params["reconstructor"]["final_norm"]["scale"]).sum()) > 0


def test_ema_quantizer_pipeline_assigns_nearest_codewords(tmp_path):
  """The whole schedule with the EMA quantizer: unique IDs, and `assign` (L2 nearest codeword
  per position) gives back the pipeline's codes."""
  schedule = dataclasses.replace(_SCHEDULE, nocode_steps=0, quantized_steps=4)
  stats = _index_tiny_corpus(tmp_path, schedule, quantizer_kind="ema_vq")
  with settings.configured(_TINY):
    corpus = index_pipeline.load_corpus("lmindexer.synthetic.index", 24)
  assert stats["unique"]
  lines = (tmp_path / "stages" / "quantized_1" / "metrics.jsonl").read_text().splitlines()
  assert "vq_commitment_loss" in lines[-1]
  manifest = indexer_manifest.read_indexer_manifest(str(tmp_path))
  np.testing.assert_array_equal(
      assign.assign_codes(manifest, corpus.tokens_NxL, partitioning.Partitioner(num_devices=1)),
      semantic_ids.read(str(tmp_path / "semantic_ids.tsv")).codes[:, :2])


def test_kmeans_only_ablation_gives_the_kmeans_codes_of_the_warmed_up_model(tmp_path):
  """No no-codebook and no quantized steps: each position's code is its k-means code and the
  T5 encoder stays at the warm-up's parameters."""
  schedule = dataclasses.replace(_SCHEDULE, nocode_steps=0, quantized_steps=0)
  stats = _index_tiny_corpus(tmp_path, schedule)
  assert stats["unique"]
  stages = tmp_path / "stages"
  codes_NxC = semantic_ids.read(str(tmp_path / "semantic_ids.tsv")).codes
  for t in range(2):
    np.testing.assert_array_equal(codes_NxC[:, t], np.load(stages / f"kmeans_{t}" / "codes.npy"))
    assert stats["positions"][t]["ami"] == stats["positions"][t]["kmeans_ami"]
  warm = index_pipeline.final_params(str(stages / "warmup"))["t5"]["encoder"]
  last = index_pipeline.final_params(str(stages / "quantized_1"))["t5"]["encoder"]
  jax.tree.map(np.testing.assert_array_equal, last, warm)


def test_schedule_steps_per_position():
  schedule = index_pipeline.Schedule(nocode_steps=(300, 150), quantized_steps=100)
  assert [schedule.steps("nocode", t) for t in range(3)] == [300, 150, 150]
  assert [schedule.steps("quantized", t) for t in range(3)] == [100, 100, 100]


def test_code_commitment_needs_the_straight_through_quantizer():
  with pytest.raises(ValueError, match="vq_commitment_weight"):
    indexer.IndexerConfig(code_commitment_weight=1.0, quantizer_kind=quantizer.EMA_VQ)


def test_per_prefix_kmeans_needs_decoded_features_and_code_commitment(tmp_path):
  with pytest.raises(ValueError, match="kmeans_features='decoded'"):
    index_pipeline.Schedule(kmeans_per_prefix=True)
  with pytest.raises(ValueError, match="code_commitment_weight"):
    index_pipeline.index(
        model_dir=str(tmp_path), index_task="lmindexer.synthetic.index", t5_config=T5_CONFIG,
        schedule=index_pipeline.Schedule(kmeans_features="decoded", kmeans_per_prefix=True))
