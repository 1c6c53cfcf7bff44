"""Baseline ID schemes: shapes, ranges, determinism, planted clusters, RQ-VAE training, the job."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import xla_env

from lmindexer_jax import metrics
from lmindexer_jax import t5
from lmindexer_jax.baselines import embeddings
from lmindexer_jax.baselines import hierarchical_kmeans
from lmindexer_jax.baselines import id_pipeline
from lmindexer_jax.baselines import random_ids
from lmindexer_jax.baselines import rq_kmeans
from lmindexer_jax.baselines import rqvae
from tasks import semantic_ids
from tasks import settings
from tasks import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (2, 3)
# A sum of a top-level centre and a second-level offset (shared by the top clusters), 30 points
# per leaf: the structure both hierarchical and residual k-means can recover exactly.
_RNG = np.random.default_rng(0)
TOP_N = np.repeat(np.arange(2), 90)
SUB_N = np.tile(np.repeat(np.arange(3), 30), 2)
LEAF_N = TOP_N * 3 + SUB_N
X_NxD = (10.0 * _RNG.normal(size=(2, 8))[TOP_N] + 2.0 * _RNG.normal(size=(3, 8))[SUB_N]
         + 0.1 * _RNG.normal(size=(180, 8))).astype(np.float32)
SMALL_RQVAE = rqvae.RqVaeConfig(latent_dim=4, hidden_dims=(32,), num_steps=300,
                                learning_rate=3e-3, batch_size=60, reset_window=50,
                                kmeans_iters=20)
TINY_CORPUS = synthetic.CorpusConfig(num_docs=96, branching=(2, 2, 2), vocab_size=200,
                                     num_users=8)
TINY_T5 = t5.T5Config(vocab_size=0, emb_dim=16, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=1, head_dim=8, mlp_dim=32,
                      mlp_activations=("gelu", "linear"), logits_via_embedding=False)


def _check_codes(codes_NxC, sizes, n):
  assert codes_NxC.shape == (n, len(sizes)) and codes_NxC.dtype == np.int32
  assert (codes_NxC >= 0).all() and (codes_NxC < np.asarray(sizes)).all()


def test_random_codes_are_uniform_seeded_and_in_range():
  codes = random_ids.random_codes(6000, (4, 3, 5), seed=1)
  _check_codes(codes, (4, 3, 5), 6000)
  np.testing.assert_array_equal(codes, random_ids.random_codes(6000, (4, 3, 5), seed=1))
  assert (codes != random_ids.random_codes(6000, (4, 3, 5), seed=2)).any()
  for t, k in enumerate((4, 3, 5)):
    share_K = np.bincount(codes[:, t], minlength=k) / 6000
    np.testing.assert_allclose(share_K, 1 / k, atol=0.03)
  with pytest.raises(ValueError, match="positive"):
    random_ids.random_codes(3, (4, 0), seed=0)


def test_atomic_codes_give_each_document_its_own_seeded_code():
  codes = random_ids.atomic_codes(50, seed=1)
  _check_codes(codes, (50,), 50)
  np.testing.assert_array_equal(np.sort(codes[:, 0]), np.arange(50))
  np.testing.assert_array_equal(codes, random_ids.atomic_codes(50, seed=1))
  assert (codes != random_ids.atomic_codes(50, seed=2)).any()
  assert (codes[:, 0] != np.arange(50)).any()  # Shuffled, not the corpus order.


@pytest.fixture(scope="module")
def hkmeans():
  return hierarchical_kmeans.hierarchical_kmeans(X_NxD, SIZES, seed=0, num_iters=50)


def test_hierarchical_kmeans_recovers_the_planted_tree(hkmeans):
  _check_codes(hkmeans.codes_NxC, SIZES, 180)
  assert metrics.ami(hkmeans.codes_NxC[:, 0], TOP_N) > 0.999
  assert metrics.ami(metrics.prefix_clusters(hkmeans.codes_NxC, 2), LEAF_N) > 0.999
  assert hkmeans.num_kmeans_runs == 3 and hkmeans.numbered_docs_C.tolist() == [0, 0]
  again = hierarchical_kmeans.hierarchical_kmeans(X_NxD, SIZES, seed=0, num_iters=50)
  np.testing.assert_array_equal(again.codes_NxC, hkmeans.codes_NxC)


def test_hierarchical_kmeans_numbers_small_groups_directly():
  # Level 1 (K=2): {0, 1, 10, 20} and {100, 101}; the 2-doc group is numbered 0, 1 then 0.
  # Level 2 (K=3) splits the 4-doc group into {0, 1}, {10}, {20}, numbered at level 3.
  x_Nx1 = np.array([[0.0], [100.0], [1.0], [10.0], [101.0], [20.0]], np.float32)
  result = hierarchical_kmeans.hierarchical_kmeans(x_Nx1, (2, 3, 3), seed=0)
  codes = result.codes_NxC
  _check_codes(codes, (2, 3, 3), 6)
  assert result.numbered_docs_C.tolist() == [0, 2, 4] and result.num_kmeans_runs == 2
  assert codes[1, 0] == codes[4, 0] != codes[0, 0]
  np.testing.assert_array_equal(codes[[1, 4], 1:], [[0, 0], [1, 0]])
  assert codes[0, 1] == codes[2, 1] and sorted(codes[[0, 2], 2]) == [0, 1]
  assert len(np.unique(codes, axis=0)) == 6  # Unique before any disambiguation.


def test_rq_kmeans_recovers_levels_and_residuals_shrink():
  result = rq_kmeans.residual_kmeans(X_NxD, SIZES, seed=0, num_iters=50)
  _check_codes(result.codes_NxC, SIZES, 180)
  assert metrics.ami(result.codes_NxC[:, 0], TOP_N) > 0.999
  assert metrics.ami(result.codes_NxC[:, 1], SUB_N) > 0.999
  assert metrics.ami(metrics.prefix_clusters(result.codes_NxC, 2), LEAF_N) > 0.999
  norms = result.residual_norms_C1
  assert len(norms) == 3 and (np.diff(norms) < 0).all() and norms[-1] < 0.05 * norms[0]
  assert [c.shape for c in result.codebooks] == [(2, 8), (3, 8)]
  again = rq_kmeans.residual_kmeans(X_NxD, SIZES, seed=0, num_iters=50)
  np.testing.assert_array_equal(again.codes_NxC, result.codes_NxC)


@pytest.fixture(scope="module")
def trained_rqvae():
  return rqvae.train_rqvae(X_NxD, SIZES, SMALL_RQVAE, seed=0)


def test_rqvae_trains_and_assigns_codes(trained_rqvae):
  _check_codes(trained_rqvae.codes_NxC, SIZES, 180)
  recon_S = trained_rqvae.history["reconstruction_loss"]
  assert len(recon_S) == 300 and np.isfinite(recon_S).all()
  assert recon_S[-20:].mean() < 0.2 * recon_S[:5].mean()
  # The top level of a well-separated mixture is found by the quantizer's first codebook.
  assert metrics.ami(trained_rqvae.codes_NxC[:, 0], TOP_N) > 0.9


def test_rqvae_is_deterministic_under_a_seed(trained_rqvae):
  again = rqvae.train_rqvae(X_NxD, SIZES, SMALL_RQVAE, seed=0)
  np.testing.assert_array_equal(again.codes_NxC, trained_rqvae.codes_NxC)
  np.testing.assert_array_equal(again.history["loss"], trained_rqvae.history["loss"])


def test_reset_dead_codes_moves_only_unused_codes():
  codebook_KxZ = jnp.arange(8.0).reshape(4, 2)
  residuals_BxZ = jnp.full((5, 2), -1.0) * jnp.arange(1.0, 6.0)[:, None]
  out = np.asarray(rqvae.reset_dead_codes(codebook_KxZ, jnp.array([3.0, 0.0, 1.0, 0.0]),
                                          residuals_BxZ, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(out[[0, 2]], np.asarray(codebook_KxZ)[[0, 2]])
  for row in out[[1, 3]]:
    assert any((row == r).all() for r in np.asarray(residuals_BxZ))


def test_dead_code_reset_revives_a_code_no_document_uses():
  model = rqvae.RqVae(8, SIZES, 4, (32,))
  tx = optax.adam(1e-3)
  state = rqvae.init_state(model, tx, X_NxD, X_NxD[rqvae.batch_indices(180, 60, 0, 0)], seed=0,
                           kmeans_iters=20)
  far = jnp.full((4,), 1e4)
  params = dict(state.params, codebook_1=state.params["codebook_1"].at[2].set(far))
  state = state.replace(params=params)

  def codes_of(state):
    return np.asarray(rqvae.assign_codes(model, state.params, X_NxD))

  assert not (codes_of(state)[:, 1] == 2).any()
  step = rqvae.make_train_step(model, tx, beta=0.25, reset_window=5)
  no_reset = rqvae.make_train_step(model, tx, beta=0.25, reset_window=0)
  rng = jax.random.PRNGKey(1)
  kept, dead = state, []
  for s in range(5):
    batch_BxD = X_NxD[rqvae.batch_indices(180, 60, 0, s)]
    state, m = step(state, batch_BxD, rng)
    kept, _ = no_reset(kept, batch_BxD, rng)
    dead.append(int(m["dead_codes"]))
  assert dead == [0, 0, 0, 0, 1]
  assert float(jnp.abs(kept.params["codebook_1"][2]).min()) > 1e3  # Without reset: still dead.
  assert float(jnp.abs(state.params["codebook_1"][2]).max()) < 100  # Re-seeded on a residual.
  assert (codes_of(state)[:, 1] == 2).any()
  np.testing.assert_array_equal(state.usage_CxK, 0)


def test_mean_pooling_ignores_padding_and_batching():
  config = TINY_T5.replace(vocab_size=50)
  _, params = embeddings.encoder_params(embeddings.EncoderSource(config, seed=3), 50)
  rng = np.random.default_rng(0)
  tokens_NxL = rng.integers(2, 50, size=(5, 12)).astype(np.int32)
  tokens_NxL[:, 7] = 1
  tokens_NxL[:, 8:] = 0
  # Batches of 2 (the last one padded with EOS rows) over 4 padding columns...
  v_NxD = embeddings.mean_pooled_encoding(config, params, tokens_NxL, batch_size=2)
  assert v_NxD.shape == (5, 16) and v_NxD.dtype == np.float32
  # ... equal the plain mean of the encoder states of the unpadded documents.
  h_NxLxD = jax.jit(lambda p, x: t5.Transformer(config).apply(
      {"params": p}, x, enable_dropout=False, method=t5.Transformer.encode))(
          params, tokens_NxL[:, :8])
  np.testing.assert_allclose(np.asarray(h_NxLxD).mean(axis=1), v_NxD, atol=1e-5)
  with pytest.raises(ValueError, match="vocab_size"):
    embeddings.mean_pooled_encoding(config.replace(vocab_size=40), params, tokens_NxL)


def test_encoder_from_an_indexer_stage_checkpoint(tmp_path):
  config = TINY_T5.replace(vocab_size=50)
  _, params = embeddings.encoder_params(embeddings.EncoderSource(config, seed=1), 50)
  stage_dir = tmp_path / "stages" / "quantized_1"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(stage_dir / "checkpoints" / "7" / "state",
                    {"params": {"t5": params, "other": np.zeros(3)}})
  checkpointer.wait_until_finished()
  got_config, got = embeddings.encoder_params(
      embeddings.EncoderSource(TINY_T5, checkpoint_dir=str(stage_dir)), 40)
  assert got_config.vocab_size == 50  # The checkpoint's rows, not the corpus vocabulary.
  jax.tree.map(np.testing.assert_array_equal, got, params)


@pytest.fixture(scope="module")
def tiny_corpus():
  from lmindexer_jax import index_pipeline

  with settings.configured(TINY_CORPUS):
    return index_pipeline.load_corpus("lmindexer.synthetic.index", 24)


def _planted_vectors(corpus):
  """Vectors that encode the corpus's level-1 and leaf labels, plus noise."""
  labels = corpus.labels_NxLv
  rng = np.random.default_rng(5)
  return (10.0 * rng.normal(size=(labels[:, 0].max() + 1, 8))[labels[:, 0]]
          + 2.0 * rng.normal(size=(labels[:, 2].max() + 1, 8))[labels[:, 2]]
          + 0.1 * rng.normal(size=(len(labels), 8))).astype(np.float32)


@pytest.mark.parametrize("scheme", id_pipeline.SCHEMES)
def test_make_ids_writes_unique_ids_and_stats(scheme, tiny_corpus, tmp_path):
  vectors = tmp_path / "vectors.npy"
  np.save(vectors, _planted_vectors(tiny_corpus))
  with settings.configured(TINY_CORPUS):
    stats = id_pipeline.make_ids(
        model_dir=str(tmp_path / scheme), scheme=scheme, index_task="lmindexer.synthetic.index",
        codebook_sizes=SIZES, max_length=24, vectors_path=str(vectors), seed=0,
        kmeans_iters=30, kmeans_restarts=2,
        rqvae_config=dataclasses.replace(SMALL_RQVAE, num_steps=50))  # The fixture's shapes.
  ids = semantic_ids.read(str(tmp_path / scheme / "semantic_ids.tsv"), tiny_corpus.doc_ids)
  n = len(tiny_corpus.doc_ids)
  sizes = (n,) if scheme == "atomic" else SIZES  # Atomic: one code per document.
  assert ids.codebook_sizes == sizes and ids.num_collisions() == 0
  assert ids.disambiguation_size == stats["disambiguation_size"]
  assert ids.disambiguation_size == stats["positions"][-1]["max_group_size"]
  written = json.loads((tmp_path / scheme / "id_stats.json").read_text())
  assert written == json.loads(json.dumps(stats)) and written["unique"]
  assert len(written["positions"]) == len(sizes)
  for position, k in zip(written["positions"], sizes, strict=True):
    assert set(position["ami"]) == {"level_1", "level_2", "level_3"}
    assert 1 <= position["codes_used"] <= k
  if scheme == "atomic":
    assert written["positions"][0]["codes_used"] == n and ids.disambiguation_size == 1
  level_1_ami = written["positions"][0]["ami"]["level_1"]
  if scheme in ("hkmeans", "rqkmeans"):
    assert level_1_ami > 0.999  # The vectors' top level is the corpus's level 1.
  if scheme == "random":
    assert abs(level_1_ami) < 0.1


def test_vectors_with_the_wrong_row_count_fail_naming_the_file(tiny_corpus, tmp_path):
  path = tmp_path / "short.npy"
  np.save(path, np.zeros((95, 4), np.float32))
  with settings.configured(TINY_CORPUS), pytest.raises(ValueError) as info:
    id_pipeline.make_ids(model_dir=str(tmp_path / "out"), scheme="rqkmeans",
                         index_task="lmindexer.synthetic.index", codebook_sizes=(2, 2),
                         max_length=24, vectors_path=str(path))
  assert str(info.value) == (f"{path}: 95 rows, but the corpus has 96 documents (one row per "
                             "document, in corpus order).")
  assert not (tmp_path / "out" / "semantic_ids.tsv").exists()
  with pytest.raises(ValueError, match="unknown ID scheme|Unknown ID scheme"):
    id_pipeline.make_ids(model_dir=str(tmp_path / "out"), scheme="pq",
                         index_task="lmindexer.synthetic.index", codebook_sizes=(2,))


def test_gin_job_runs_rqvae_on_the_synthetic_corpus(tmp_path):
  command = [
      sys.executable, "-m", "lmindexer_jax.train", "--gin_file=gin/runs/ids_rqvae.gin",
      "--gin_file=gin/data/synthetic.gin", f"--gin.MODEL_DIR='{tmp_path}'",
      "--gin.tasks.synthetic.CorpusConfig.num_docs=96",
      "--gin.tasks.synthetic.CorpusConfig.branching=(2, 2, 2)",
      "--gin.tasks.synthetic.CorpusConfig.vocab_size=200",
      "--gin.tasks.synthetic.CorpusConfig.num_users=8",
      "--gin.CODEBOOK_SIZES=(4, 4)", "--gin.MAX_LENGTH=24",
      "--gin.rqvae.RqVaeConfig.num_steps=30", "--gin.rqvae.RqVaeConfig.batch_size=32",
  ]
  result = subprocess.run(command, cwd=REPO, env=xla_env.env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  ids = semantic_ids.read(str(tmp_path / "semantic_ids.tsv"))
  assert len(ids.doc_ids) == 96 and ids.num_collisions() == 0 and ids.codebook_sizes == (4, 4)
  stats = json.loads((tmp_path / "id_stats.json").read_text())
  assert stats["scheme"] == "rqvae" and stats["vector_dim"] == 32  # t5_tiny's emb_dim
  assert np.load(tmp_path / "embeddings.npy").shape == (96, 32)
