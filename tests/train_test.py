"""The trainer in-process: starting from given parameters, and the shape checks on them."""

import jax
import numpy as np
import pytest

from lmindexer_jax import data
from lmindexer_jax import models
from lmindexer_jax import optimizers
from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import train
from tasks import smoke

_CONFIG = t5.T5Config(
    vocab_size=smoke.VOCABULARY.vocab_size, emb_dim=16, num_heads=2, num_encoder_layers=1,
    num_decoder_layers=1, head_dim=8, mlp_dim=32, dropout_rate=0.0,
)
_DATA = data.DatasetConfig(
    mixture_or_task_name=smoke.TASK_NAME, task_feature_lengths={"inputs": 12, "targets": 12},
    batch_size=8,
)


def _abstract_state(model, tx):
  partitioner = partitioning.Partitioner()
  spec = {
      k: jax.ShapeDtypeStruct((8, 12), np.int32)
      for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
  }
  shardings, init = train.state_shardings(model, tx, partitioner, spec)
  return jax.eval_shape(init, jax.random.PRNGKey(0)), shardings


def test_given_parameters_must_match_the_model():
  model = models.EncoderDecoderModel(t5.Transformer(_CONFIG))
  tx = optimizers.adamw(1e-3, total_steps=10).tx
  abstract, shardings = _abstract_state(model, tx)
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract.params)

  wrong = jax.tree.map(lambda x: x, params)
  wrong["token_embedder"]["embedding"] = np.zeros((3, 16), np.float32)
  with pytest.raises(ValueError, match=r"\['token_embedder'\]\['embedding'\].*\(3, 16\)"):
    train.state_from_params(wrong, abstract, shardings, tx)

  missing = jax.tree.map(lambda x: x, params)
  del missing["decoder"]["decoder_norm"]
  with pytest.raises(ValueError, match="lack.*decoder_norm"):
    train.state_from_params(missing, abstract, shardings, tx)

  state = train.state_from_params(params, abstract, shardings, tx)
  assert int(state.step) == 0
  assert state.params["token_embedder"]["embedding"].sharding == (
      shardings.params["token_embedder"]["embedding"])


def test_fresh_run_starts_from_init_params_fn(tmp_path):
  model = models.EncoderDecoderModel(t5.Transformer(_CONFIG))
  rng = np.random.default_rng(0)
  abstract, _ = _abstract_state(model, optimizers.adamw(1e-3, total_steps=1).tx)
  given = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), abstract.params)
  # With a zero learning rate the parameters after training are exactly the ones given.
  state = train.train(
      model=model, train_dataset_cfg=_DATA, optimizer=optimizers.adamw(0.0, total_steps=2),
      total_steps=2, model_dir=str(tmp_path), init_params_fn=lambda: given, log_period=1,
  )
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), given)
