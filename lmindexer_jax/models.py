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

from lmindexer_jax import losses

Batch = Mapping[str, jax.Array]
Params = Any
# A loss may return, under this key of its metrics, new values for parameters that are not
# trained by gradient (an EMA codebook): a nested dict of some of `params`' leaves, written over
# them after the optimizer step (`apply_state_updates`). Their gradient must be zero.
STATE_UPDATES = "state_updates"


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


def apply_state_updates(params: Params, updates: Mapping[str, Any]) -> Params:
  """`params` with the leaves named in `updates` (a nested dict) replaced."""
  out = dict(params)
  for key, value in updates.items():
    if key not in params:
      raise KeyError(f"state update {key!r} names no parameter (have {sorted(params)})")
    out[key] = apply_state_updates(params[key], value) if isinstance(value, Mapping) else value
  return out


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
    loss, accuracy, num_tokens = losses.token_cross_entropy(
        logits_BxTxV, batch["decoder_target_tokens"], weights_BxT)
    return loss, {
        "loss": loss,
        "accuracy": accuracy,
        "target_tokens": num_tokens,
        "input_tokens": jnp.sum(batch["encoder_input_tokens"] > 0).astype(jnp.float32),
    }


def _ones(x: Any) -> jax.Array:
  return jnp.ones(x.shape, x.dtype)
