"""What the trainer knows of a model: its parameters' initialisation and its loss.

The loop in `train.py` only calls `init_params` and `loss_fn`, so the semantic indexer plugs
its own module and losses into the same loop (t5x's `BaseModel` split, smaller).

Legend: B batch, L encoder length, T decoder length, V vocab.
"""

import abc
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, jax.Array]
Params = Any


class BaseModel(abc.ABC):
  """A Flax module plus its loss."""

  @abc.abstractmethod
  def init_params(self, rng: jax.Array, batch: Batch) -> Params:
    """Parameters (boxed with logical axes) for batches shaped like `batch`.

    `batch` may hold `jax.ShapeDtypeStruct`s: only shapes and dtypes are read.
    """

  @abc.abstractmethod
  def loss_fn(
      self, params: Params, batch: Batch, rng: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss to minimise, metrics); `rng` None means deterministic (no dropout)."""


def cross_entropy(
    logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and summed correct predictions over weighted tokens."""
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), targets_BxT
  )
  correct_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return jnp.sum(ce_BxT * weights_BxT), jnp.sum(correct_BxT * weights_BxT)


class EncoderDecoderModel(BaseModel):
  """A T5-style seq2seq model trained with token cross-entropy (seqio's EncDec features)."""

  def __init__(self, module: nn.Module):
    self.module = module

  def init_params(self, rng: jax.Array, batch: Batch) -> Params:
    return self.module.init(
        {"params": rng},
        _ones(batch["encoder_input_tokens"]),
        _ones(batch["decoder_input_tokens"]),
        enable_dropout=False,
    )["params"]

  def loss_fn(self, params, batch, rng):
    logits_BxTxV = self.module.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        enable_dropout=rng is not None,
        rngs={"dropout": rng} if rng is not None else None,
    )
    weights_BxT = batch.get("decoder_loss_weights", batch["decoder_target_tokens"] > 0)
    weights_BxT = weights_BxT.astype(jnp.float32)
    ce_sum, correct = cross_entropy(logits_BxTxV, batch["decoder_target_tokens"], weights_BxT)
    num_tokens = jnp.maximum(jnp.sum(weights_BxT), 1.0)
    loss = ce_sum / num_tokens
    return loss, {
        "loss": loss,
        "accuracy": correct / num_tokens,
        "target_tokens": jnp.sum(weights_BxT),
        "input_tokens": jnp.sum(batch["encoder_input_tokens"] > 0).astype(jnp.float32),
    }


def _ones(x: Any) -> jax.Array:
  return jnp.ones(x.shape, x.dtype)
