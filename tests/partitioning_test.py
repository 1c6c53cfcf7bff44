"""Sharded training equals single-device training, on 8 simulated CPU devices."""

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from lmindexer_jax import models
from lmindexer_jax import optimizers
from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import train

_B, _L, _T = 8, 12, 6


def _tiny_model() -> models.EncoderDecoderModel:
  # Sizes divisible by every mesh's model axis (1, 2, 4) so each rule really shards.
  config = t5.T5Config(
      vocab_size=64,
      emb_dim=16,
      num_heads=4,
      num_encoder_layers=2,
      num_decoder_layers=2,
      head_dim=4,
      mlp_dim=32,
      dropout_rate=0.1,
  )
  return models.EncoderDecoderModel(t5.Transformer(config))


def _batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 64, size=(_B, _T)).astype(np.int32)
  targets[:, -2:] = 0  # Padding.
  inputs = rng.integers(2, 64, size=(_B, _L)).astype(np.int32)
  inputs[: _B // 2, -3:] = 0
  decoder_inputs = np.concatenate([np.zeros((_B, 1), np.int32), targets[:, :-1]], axis=1)
  return {
      "encoder_input_tokens": inputs,
      "decoder_input_tokens": decoder_inputs,
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.int32),
  }


def _run(partitioner: partitioning.Partitioner, num_steps: int = 3, tx=None):
  model = _tiny_model()
  tx = tx or optimizers.adamw(1e-3, total_steps=10, warmup_steps=2).tx
  batch = _batch()
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  with partitioner.activate():
    shardings, init = train.state_shardings(model, tx, partitioner, batch_spec)
    state = init(jax.random.PRNGKey(0))
    step_fn = train.jit_train_step(model, tx, partitioner, shardings, batch_spec)
    global_batch = partitioner.global_batch(batch)
    losses = []
    for _ in range(num_steps):
      state, metrics = step_fn(state, global_batch, jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
  return state, shardings, losses


@pytest.fixture(scope="module")
def single_device_run():
  return _run(partitioning.Partitioner(num_devices=1))


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4)])
def test_sharded_training_equals_single_device(mesh_shape, single_device_run):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  data, model = mesh_shape
  partitioner = partitioning.Partitioner(num_partitions=model)
  assert dict(partitioner.mesh.shape) == {"data": data, "model": model}
  state, shardings, losses = _run(partitioner)
  ref_state, _, ref_losses = single_device_run

  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=1e-5)
  assert losses[-1] < losses[0]
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
      state.params,
      ref_state.params,
  )
  # The state really is laid out on the mesh: mlp/heads/vocab split over `model`.
  leaves = jax.tree.leaves(state.params)
  assert all(len(a.sharding.device_set) == 8 for a in leaves)
  split = [a.sharding.shard_shape(a.shape) != a.shape for a in leaves]
  assert any(split) == (model > 1)


def test_rule_table_maps_logical_axes():
  partitioner = partitioning.Partitioner(num_partitions=2) if jax.device_count() >= 2 else None
  if partitioner is None:
    pytest.skip("needs 2 devices")
  assert partitioner.sharding(P("batch", "length", "embed")).spec == P("data", None, None)
  assert partitioner.sharding(P("embed", "mlp")).spec == P(None, "model")
  assert partitioner.sharding(P("vocab", "embed")).spec == P("model", None)
  assert partitioner.sharding(P("heads", "relpos_buckets")).spec == P("model", None)


def test_optimizer_moments_follow_their_parameters():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices")
  partitioner = partitioning.Partitioner(num_partitions=2)
  tx = optax.adamw(1e-3)
  model = _tiny_model()
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch().items()}
  shardings, _ = train.state_shardings(model, tx, partitioner, batch_spec)
  adam_state = shardings.opt_state[0]
  assert jax.tree.structure(adam_state.mu) == jax.tree.structure(shardings.params)
  jax.tree.map(lambda m, p: m.spec == p.spec or pytest.fail(f"{m} != {p}"),
               adam_state.mu, shardings.params)
  assert adam_state.count.spec == P()


def test_num_partitions_must_divide_devices():
  with pytest.raises(ValueError, match="num_partitions"):
    partitioning.Partitioner(num_partitions=3, num_devices=8)


def test_adafactor_state_shards_and_trains():
  """Factored second moments are not parameter-shaped: they are replicated, and training runs."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  tx = optimizers.adafactor(1e-2, total_steps=10).tx
  _, shardings, losses = _run(partitioning.Partitioner(num_partitions=2), tx=tx)
  assert losses[-1] < losses[0]
  specs = {s.spec for s in jax.tree.leaves(shardings.opt_state)}
  assert P() in specs and any("model" in spec for spec in specs)
