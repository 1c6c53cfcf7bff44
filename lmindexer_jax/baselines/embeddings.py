"""Document vectors for the baseline ID schemes: a frozen T5 encoder, mean-pooled, or a `.npy`.

The encoder comes from an indexer run's training stage (`index_pipeline.final_params`, its
`params["t5"]`), a local Hugging Face folder (`checkpoint_import`), or a random init.

Legend: N documents, L tokens, D d_model, B batch, V vocabulary.
"""

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmindexer_jax import checkpoint_import
from lmindexer_jax import index_pipeline
from lmindexer_jax import t5


@dataclasses.dataclass(frozen=True)
class EncoderSource:
  """Where the frozen T5 encoder comes from (at most one of `checkpoint_dir`, `hf_dir`).

  Attributes:
    t5_config: the model's sizes (its vocab_size is replaced: the checkpoint's rows, or the
      corpus vocabulary for a random init); unused with `hf_dir`, whose config.json decides.
    checkpoint_dir: a finished training stage of an indexer run, e.g.
      `runs/index/stages/quantized_2` (its last checkpoint's `params["t5"]`).
    hf_dir: a local Hugging Face T5 folder; its vocabulary must be the corpus task's.
    seed: seeds the random init (neither directory given).
    batch_size: documents per encoder call.
  """

  t5_config: t5.T5Config | None = None
  checkpoint_dir: str = ""
  hf_dir: str = ""
  seed: int = 0
  batch_size: int = 256


def encoder_params(source: EncoderSource, base_vocab_size: int) -> tuple[t5.T5Config, Any]:
  """The T5 config and (host) parameters that `source` names."""
  if source.checkpoint_dir and source.hf_dir:
    raise ValueError("Give at most one of EncoderSource.checkpoint_dir and .hf_dir.")
  if source.hf_dir:
    return checkpoint_import.load_checkpoint(source.hf_dir)
  if source.t5_config is None:
    raise ValueError("EncoderSource.t5_config is needed without hf_dir (bind MODEL_CONFIG).")
  if source.checkpoint_dir:
    params = index_pipeline.final_params(source.checkpoint_dir)
    params = params.get("t5", params)  # An indexer stage, or a plain T5 run.
    rows = params["token_embedder"]["embedding"].shape[0]
    return source.t5_config.replace(vocab_size=rows), params
  config = source.t5_config.replace(vocab_size=base_vocab_size)
  return config, jax.tree.map(np.asarray, _init_t5(config, jax.random.PRNGKey(source.seed)))


@functools.partial(jax.jit, static_argnames="config")
def _init_t5(config: t5.T5Config, rng: jax.Array) -> Any:
  tokens = jnp.ones((1, 1), jnp.int32)
  return nn.unbox(t5.Transformer(config).init(rng, tokens, tokens, enable_dropout=False)["params"])


def mean_pooled_encoding(
    config: t5.T5Config, params: Any, tokens_NxL: np.ndarray, batch_size: int = 256
) -> np.ndarray:
  """float32 [N, D]: the encoder's final states averaged over non-padding tokens (no dropout).

  The corpus is encoded in batches of one shape (the last one padded with EOS-only rows), so
  the jitted encoder compiles once.
  """
  tokens_NxL = np.asarray(tokens_NxL, np.int32)
  n, length = tokens_NxL.shape
  if tokens_NxL.max(initial=0) >= config.vocab_size:
    raise ValueError(f"token id {tokens_NxL.max()} >= the encoder's vocab_size "
                     f"{config.vocab_size}: the encoder does not match the corpus vocabulary.")
  batch_size = min(batch_size, n)
  n_pad = -(-n // batch_size) * batch_size
  padded_NxL = np.concatenate([tokens_NxL, np.ones((n_pad - n, length), np.int32)])
  model = t5.Transformer(config)

  @jax.jit
  def encode(params, tokens_BxL):
    h_BxLxD = model.apply({"params": params}, tokens_BxL, enable_dropout=False,
                          method=t5.Transformer.encode).astype(jnp.float32)
    mask_BxL = (tokens_BxL > 0).astype(jnp.float32)
    total_BxD = jnp.einsum("bld,bl->bd", h_BxLxD, mask_BxL)
    return total_BxD / jnp.maximum(jnp.sum(mask_BxL, axis=1, keepdims=True), 1.0)

  params = jax.device_put(params)
  out = [np.asarray(encode(params, padded_NxL[i:i + batch_size]))
         for i in range(0, n_pad, batch_size)]
  return np.concatenate(out)[:n]


def encode_corpus(source: EncoderSource, tokens_NxL: np.ndarray,
                  base_vocab_size: int) -> np.ndarray:
  """Mean-pooled encoder states of every document with the encoder `source` names."""
  config, params = encoder_params(source, base_vocab_size)
  return mean_pooled_encoding(config, params, tokens_NxL, source.batch_size)


def load_vectors(path: str, num_docs: int) -> np.ndarray:
  """float32 [N, D] vectors of a `.npy` file, one row per document in corpus order.

  Raises:
    ValueError: naming the file, if it is unreadable, not 2-D, not finite or has another
      number of rows than the corpus has documents.
  """
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such vectors file.")
  try:
    vectors = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a .npy array ({e}).") from None
  if not isinstance(vectors, np.ndarray):  # An .npz archive.
    raise ValueError(f"{path}: expected one .npy array, got {type(vectors).__name__}.")
  if not np.issubdtype(vectors.dtype, np.number):
    raise ValueError(f"{path}: vectors must be numbers, got dtype {vectors.dtype}.")
  if vectors.ndim != 2:
    raise ValueError(f"{path}: vectors must be [N, D], got shape {vectors.shape}.")
  if vectors.shape[0] != num_docs:
    raise ValueError(f"{path}: {vectors.shape[0]} rows, but the corpus has {num_docs} "
                     "documents (one row per document, in corpus order).")
  if not np.isfinite(vectors).all():
    raise ValueError(f"{path}: vectors must be finite (found NaN or inf).")
  return vectors.astype(np.float32)
