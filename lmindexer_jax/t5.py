"""T5 encoder-decoder (v1.0 and v1.1) in Flax Linen, with the t5x `Transformer` interface.

Numerics follow Hugging Face `T5ForConditionalGeneration` (so imported checkpoints give the same
outputs, see `checkpoint_import.py`); the parameter layout, logical axis names and cache follow
t5x's `examples/t5/network.py`.

Shape letters: B batch, L encoder length, T decoder length, S attended-to (key) length,
D emb_dim, H heads, K head_dim, F mlp_dim, V vocab, R relative-position buckets.
"""

from collections.abc import Sequence
import functools
import math
import operator
from typing import Any

from flax import linen as nn
from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Masked attention logits get this bias; exp() of it underflows to exactly 0 in float32.
_NEG_INF = -1e10

# T5 initialisers, shared with `checkpoint_import.extend_vocab`: unit-variance token embeddings
# (the tied head rescales by emb_dim**-0.5) and fan-in scaled kernels (`dense_init`).
EMBEDDING_INIT = nn.initializers.normal(stddev=1.0)
RELPOS_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

_ACTIVATIONS = {
    "relu": nn.relu,
    # tanh approximation: HF's `gelu_new`, which its `gated-gelu` (T5 v1.1) uses.
    "gelu": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
    "linear": lambda x: x,
}


@struct.dataclass
class T5Config:
  """Global hyperparameters of a T5 model.

  `mlp_activations=('relu',)` with `logits_via_embedding=True` is T5 v1.0 (HF `t5-base`);
  `('gelu', 'linear')` (gated GELU) with `logits_via_embedding=False` is T5 v1.1. `dtype` is the
  compute dtype ('float32' or 'bfloat16', a string or a numpy dtype); parameters are float32.
  """

  vocab_size: int
  emb_dim: int
  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  head_dim: int
  mlp_dim: int
  mlp_activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  # True: the LM head is the transposed token embedding, applied after scaling the decoder
  # output by emb_dim**-0.5 (T5 v1.0). False: a separate `logits_dense` kernel (T5 v1.1).
  logits_via_embedding: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6


def dense_init(num_in_axes: int, num_out_axes: int, scale: float = 1.0,
               distribution: str = "truncated_normal") -> nn.initializers.Initializer:
  """Fan-in variance scaling for a kernel whose first `num_in_axes` axes are contracted."""
  return nn.initializers.variance_scaling(
      scale, "fan_in", distribution,
      in_axis=tuple(range(num_in_axes)),
      out_axis=tuple(range(num_in_axes, num_in_axes + num_out_axes)))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """Maps relative positions (key - query) to T5's relative-attention buckets.

  Half of the buckets are exact small distances, the rest logarithmic up to `max_distance`;
  everything farther shares the last bucket. Bidirectional (encoder) splits the buckets between
  keys before and after the query; unidirectional (decoder) only sees keys at or before it.
  Computed on the host in float32 exactly as Mesh TensorFlow / HF do, so the bucket edges do
  not depend on an accelerator's `log`.

  Args:
    relative_position: int array, key position minus query position.
    bidirectional: whether keys after the query get their own buckets.
    num_buckets: number of buckets R.
    max_distance: distances at or beyond this share the last bucket.

  Returns:
    int32 array of the same shape, values in [0, num_buckets).
  """
  relative_position = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0) * num_buckets
    distance = np.abs(relative_position)
  else:
    distance = np.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  # Clamped below at max_exact only to keep log() finite; small distances use `distance` itself.
  safe = np.maximum(distance, max_exact).astype(np.float32)
  log_ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
  if_large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
  if_large = np.minimum(if_large, num_buckets - 1)
  buckets += np.where(distance < max_exact, distance, if_large)
  return buckets.astype(np.int32)


def bernoulli_keep(rng: jax.Array, keep_prob: float | jax.Array, shape: Sequence[int]
                   ) -> tuple[jax.Array, jax.Array]:
  """A bool mask, True with probability `keep_prob` (rounded to 1/65536), and that probability.

  Each 32-bit random word gives two 16-bit draws compared with an integer threshold: half the
  threefry evaluations of `jax.random.bernoulli` (one per element, then a float uniform), 3.4x
  faster on CPU, where dropout's masks were ~45% of a small model's fine-tuning step. Counters
  follow the shape, as with partitionable threefry, so a sharded mask equals the unsharded one.
  """
  *lead, n = tuple(shape) or (1,)
  words = -(-n // 2)
  bits = jax.random.bits(rng, (*lead, words), jnp.uint32)
  draws = lax.bitcast_convert_type(bits, jnp.uint16).reshape(*lead, 2 * words)[..., :n]
  drop = jnp.round((1.0 - jnp.asarray(keep_prob, jnp.float32)) * 65536.0).astype(jnp.int32)
  keep = draws.astype(jnp.int32) >= drop
  return keep.reshape(shape), 1.0 - drop.astype(jnp.float32) / 65536.0


class Dropout(nn.Module):
  """`nn.Dropout` on `bernoulli_keep` masks; kept values are scaled by the exact keep rate."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep, keep_prob = bernoulli_keep(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))


class LayerNorm(nn.Module):
  """T5 layer norm: RMS scaling only (no mean subtraction, no bias), computed in float32."""

  epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD.astype(jnp.float32)
    scale_D = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x_BxLxD.shape[-1],), jnp.float32)
    mean_square_BxLx1 = jnp.mean(jnp.square(x_BxLxD), axis=-1, keepdims=True)
    y_BxLxD = x_BxLxD * lax.rsqrt(mean_square_BxLx1 + self.epsilon)
    scale_1x1xD = scale_D.reshape((1,) * (y_BxLxD.ndim - 1) + scale_D.shape)
    return (y_BxLxD * scale_1x1xD).astype(self.dtype)


class DenseGeneral(nn.Module):
  """Bias-free linear map contracting the last `num_contract` input axes into `features`."""

  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  num_contract: int = 1
  dtype: Any = jnp.float32
  init_scale: float = 1.0
  init_distribution: str = "truncated_normal"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = self.num_contract
    kernel_shape = x.shape[-n:] + tuple(self.features)
    init = dense_init(n, len(self.features), self.init_scale, self.init_distribution)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        kernel_shape, jnp.float32)
    contract_x = tuple(range(x.ndim - n, x.ndim))
    return lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                           ((contract_x, tuple(range(n))), ((), ())))


class Embed(nn.Module):
  """Token embedding [V, D], shared by encoder, decoder and (v1.0) the LM head."""

  num_embeddings: int
  features: int
  dtype: Any

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(EMBEDDING_INIT, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    x_BxLxD = jnp.take(self.embedding, tokens_BxL.astype(jnp.int32), axis=0)
    return x_BxLxD.astype(self.dtype)

  def attend(self, h_BxTxD: jax.Array) -> jax.Array:
    # float32 for logit stability, as t5x's `attend_dtype`.
    return jnp.einsum("btd,vd->btv", h_BxTxD.astype(jnp.float32), self.embedding)


class RelativePositionBias(nn.Module):
  """T5 relative position bias: one learned scalar per (head, bucket)."""

  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_length: int, key_length: int,
               query_offset: jax.Array | int = 0) -> jax.Array:
    """Returns the [1, H, T, S] bias for queries at `query_offset + arange(T)`, keys arange(S).

    `query_offset` may be traced (the cache index while decoding): buckets come from a host
    table over every relative position that can occur, gathered at run time.
    """
    cfg = self.config
    rel_emb_HxR = self.param(
        "rel_embedding", nn.with_logical_partitioning(RELPOS_INIT, ("heads", "relpos_buckets")),
        (cfg.num_heads, cfg.relative_attention_num_buckets), jnp.float32)
    # Relative positions (key - query) lie in [-span, span].
    span = max(query_length, key_length) - 1
    table = relative_position_bucket(
        np.arange(-span, span + 1), self.bidirectional,
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    query_pos_T = query_offset + jnp.arange(query_length)
    relative_TxS = jnp.arange(key_length)[None, :] - query_pos_T[:, None]
    buckets_TxS = jnp.asarray(table)[jnp.clip(relative_TxS + span, 0, 2 * span)]
    bias_HxTxS = jnp.take(rel_emb_HxR, buckets_TxS, axis=1)
    return bias_HxTxS[None]


class MultiHeadAttention(nn.Module):
  """T5 multi-head attention, with t5x's autoregressive cache for decoder self-attention."""

  config: T5Config

  @nn.compact
  def __call__(self, xq_BxTxD: jax.Array | None, xkv_BxSxD: jax.Array | None,
               bias_BxHxTxS: jax.Array | None, *, enable_dropout: bool, decode: bool = False,
               kv: tuple[jax.Array, jax.Array] | None = None, kv_only: bool = False):
    """Attends from `xq` to `xkv`.

    `kv_only=True` returns the projected (key, value) [B, S, H, K] of `xkv` and nothing else;
    `kv` passes such a pair back in place of projecting `xkv` (cross-attention keys and values
    computed once per encoded input). The key/value batch may divide the query batch: query row
    i then attends to key/value row i // (query batch / key batch), e.g. all beams of a query to
    that query's encoder states, without copying them per beam.
    """
    cfg = self.config
    projection = functools.partial(
        DenseGeneral, features=(cfg.num_heads, cfg.head_dim), kernel_axes=("embed", "heads", "kv"),
        dtype=cfg.dtype, init_distribution="normal")

    def project_kv():
      k_BxSxHxK = projection(name="key")(xkv_BxSxD)
      v_BxSxHxK = projection(name="value")(xkv_BxSxD)
      return (nn.with_logical_constraint(k_BxSxHxK, ("batch", "length", "heads", "kv")),
              nn.with_logical_constraint(v_BxSxHxK, ("batch", "length", "heads", "kv")))

    if kv_only:
      return project_kv()
    # NOTE: T5 does not rescale attention logits by 1/sqrt(head_dim). The scaling is folded into
    # the query initialiser (as in t5x and Mesh TF), so training from scratch is well scaled.
    q_BxTxHxK = projection(init_scale=1.0 / cfg.head_dim, name="query")(xq_BxTxD)
    k_BxSxHxK, v_BxSxHxK = project_kv() if kv is None else kv
    q_BxTxHxK = nn.with_logical_constraint(q_BxTxHxK, ("batch", "length", "heads", "kv"))
    if decode:
      k_BxSxHxK, v_BxSxHxK = self._update_cache(k_BxSxHxK, v_BxSxHxK)

    batch, length, heads, head_dim = q_BxTxHxK.shape
    kv_batch = k_BxSxHxK.shape[0]
    if batch % kv_batch:
      raise ValueError(f"Key/value batch {kv_batch} does not divide the query batch {batch}.")
    # Queries grouped per key/value row: [Bkv, G, T, H, K] (G = 1 for ordinary attention).
    q_BxGxTxHxK = q_BxTxHxK.reshape(kv_batch, batch // kv_batch, length, heads, head_dim)
    # Logits and softmax in float32 whatever the compute dtype.
    logits_BxGxHxTxS = jnp.einsum("bgthk,bshk->bghts", q_BxGxTxHxK.astype(jnp.float32),
                                  k_BxSxHxK.astype(jnp.float32))
    if bias_BxHxTxS.shape[0] == batch and batch != kv_batch:
      bias_BxGxHxTxS = bias_BxHxTxS.reshape(kv_batch, batch // kv_batch, *bias_BxHxTxS.shape[1:])
    else:
      bias_BxGxHxTxS = bias_BxHxTxS[:, None]
    weights_BxGxHxTxS = jax.nn.softmax(logits_BxGxHxTxS + bias_BxGxHxTxS).astype(cfg.dtype)
    weights_BxGxHxTxS = Dropout(cfg.dropout_rate)(weights_BxGxHxTxS,
                                                  deterministic=not enable_dropout)
    out_BxGxTxHxK = jnp.einsum("bghts,bshk->bgthk", weights_BxGxHxTxS, v_BxSxHxK.astype(cfg.dtype))
    out_BxTxHxK = out_BxGxTxHxK.reshape(batch, length, heads, head_dim)
    return DenseGeneral(
        features=(xq_BxTxD.shape[-1],), kernel_axes=("heads", "kv", "embed"), num_contract=2,
        dtype=cfg.dtype, init_distribution="normal", name="out")(out_BxTxHxK)

  def _update_cache(self, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array):
    """Writes this step's key/value at `cache_index` and returns the whole cache.

    The first call (no cache yet, full-length inputs) only creates zeroed variables and passes
    k/v through. Later calls take one position, [B, 1, H, K].
    """
    is_initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BxSxHxK.shape, k_BxSxHxK.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BxSxHxK.shape,
                                 v_BxSxHxK.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return k_BxSxHxK, v_BxSxHxK
    batch, _, heads, head_dim = cached_key.value.shape
    if k_BxSxHxK.shape != (batch, 1, heads, head_dim):
      raise ValueError(f"Cached decoding takes one position of shape {(batch, 1, heads, head_dim)}"
                       f" per call, got {k_BxSxHxK.shape}.")
    i = cache_index.value
    cached_key.value = lax.dynamic_update_slice(cached_key.value, k_BxSxHxK, (0, i, 0, 0))
    cached_value.value = lax.dynamic_update_slice(cached_value.value, v_BxSxHxK, (0, i, 0, 0))
    cache_index.value = i + 1
    return cached_key.value, cached_value.value


class MlpBlock(nn.Module):
  """T5 feed-forward block; several activations are multiplied (gated GELU in v1.1)."""

  config: T5Config

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, enable_dropout: bool) -> jax.Array:
    cfg = self.config
    hidden = []
    for i, name in enumerate(cfg.mlp_activations):
      h_BxLxF = DenseGeneral(
          features=(cfg.mlp_dim,), kernel_axes=("embed", "mlp"), dtype=cfg.dtype,
          name="wi" if len(cfg.mlp_activations) == 1 else f"wi_{i}")(x_BxLxD)
      hidden.append(_ACTIVATIONS[name](h_BxLxF))
    h_BxLxF = functools.reduce(operator.mul, hidden)
    h_BxLxF = Dropout(cfg.dropout_rate)(h_BxLxF, deterministic=not enable_dropout)
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    return DenseGeneral(features=(x_BxLxD.shape[-1],), kernel_axes=("mlp", "embed"),
                        dtype=cfg.dtype, name="wo")(h_BxLxF)


def _residual(config: T5Config, x_BxLxD: jax.Array, y_BxLxD: jax.Array,
              enable_dropout: bool) -> jax.Array:
  y_BxLxD = Dropout(config.dropout_rate)(y_BxLxD, deterministic=not enable_dropout)
  return nn.with_logical_constraint(x_BxLxD + y_BxLxD, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP block."""

  config: T5Config

  @nn.compact
  def __call__(self, x_BxLxD, bias_BxHxLxL, enable_dropout):
    cfg = self.config
    y_BxLxD = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_attention_layer_norm")(x_BxLxD)
    y_BxLxD = MultiHeadAttention(cfg, name="attention")(
        y_BxLxD, y_BxLxD, bias_BxHxLxL, enable_dropout=enable_dropout)
    x_BxLxD = _residual(cfg, x_BxLxD, y_BxLxD, enable_dropout)
    y_BxLxD = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(x_BxLxD)
    y_BxLxD = MlpBlock(cfg, name="mlp")(y_BxLxD, enable_dropout)
    return _residual(cfg, x_BxLxD, y_BxLxD, enable_dropout)


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention to the encoder, and MLP block."""

  config: T5Config

  @nn.compact
  def __call__(self, x_BxTxD, encoded_BxLxD, self_bias_BxHxTxS, cross_bias_BxHxTxL,
               enable_dropout, decode, cross_kv=None, cross_kv_only=False):
    """`cross_kv_only`: return this layer's cross-attention (key, value) of `encoded` only;
    `cross_kv`: use such a pair instead of projecting `encoded` (see MultiHeadAttention)."""
    cfg = self.config
    if cross_kv_only:
      return MultiHeadAttention(cfg, name="encoder_decoder_attention")(
          None, encoded_BxLxD, None, enable_dropout=False, kv_only=True)
    y_BxTxD = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype,
                        name="pre_self_attention_layer_norm")(x_BxTxD)
    y_BxTxD = MultiHeadAttention(cfg, name="self_attention")(
        y_BxTxD, y_BxTxD, self_bias_BxHxTxS, enable_dropout=enable_dropout, decode=decode)
    x_BxTxD = _residual(cfg, x_BxTxD, y_BxTxD, enable_dropout)
    y_BxTxD = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype,
                        name="pre_cross_attention_layer_norm")(x_BxTxD)
    y_BxTxD = MultiHeadAttention(cfg, name="encoder_decoder_attention")(
        y_BxTxD, encoded_BxLxD, cross_bias_BxHxTxL, enable_dropout=enable_dropout, kv=cross_kv)
    x_BxTxD = _residual(cfg, x_BxTxD, y_BxTxD, enable_dropout)
    y_BxTxD = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(x_BxTxD)
    y_BxTxD = MlpBlock(cfg, name="mlp")(y_BxTxD, enable_dropout)
    return _residual(cfg, x_BxTxD, y_BxTxD, enable_dropout)


def _mask_to_bias(mask: jax.Array) -> jax.Array:
  return jnp.where(mask, 0.0, _NEG_INF).astype(jnp.float32)


class Encoder(nn.Module):
  """Embedding, encoder layers sharing one bidirectional relative position bias, final norm."""

  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, enable_dropout: bool) -> jax.Array:
    cfg = self.config
    length = tokens_BxL.shape[1]
    # Computed once and shared by all layers (HF computes it in the first layer).
    relpos_1xHxLxL = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(
        length, length)
    # Padding keys are masked; padding queries still attend (their outputs are unused), as HF.
    key_mask_Bx1x1xL = (tokens_BxL > 0)[:, None, None, :]
    bias_BxHxLxL = relpos_1xHxLxL + _mask_to_bias(key_mask_Bx1x1xL)

    x_BxLxD = self.shared_embedding(tokens_BxL)
    x_BxLxD = Dropout(cfg.dropout_rate)(x_BxLxD, deterministic=not enable_dropout)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    for i in range(cfg.num_encoder_layers):
      x_BxLxD = EncoderLayer(cfg, name=f"layers_{i}")(x_BxLxD, bias_BxHxLxL, enable_dropout)
    x_BxLxD = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm")(x_BxLxD)
    x_BxLxD = Dropout(cfg.dropout_rate)(x_BxLxD, deterministic=not enable_dropout)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))


class Decoder(nn.Module):
  """Embedding, decoder layers sharing one causal relative position bias, final norm.

  Returns the final hidden states [B, T, D]; the LM head lives in `Transformer`.
  """

  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, encoded_BxLxD, encoder_tokens_BxL, decoder_tokens_BxT, decoder_target_tokens,
               enable_dropout, decode, max_decode_length, cross_kv=None, cross_kv_only=False):
    cfg = self.config
    if cross_kv_only:
      return tuple(DecoderLayer(cfg, name=f"layers_{i}")(
          None, encoded_BxLxD, None, None, False, False, cross_kv_only=True)
                   for i in range(cfg.num_decoder_layers))
    relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
    length = decoder_tokens_BxT.shape[1]
    # The first layer's self-attention cache tells whether this is a cached step, where it is
    # (cache_index, before the layer advances it) and how long the cache is.
    first_cache = self.variables.get("cache", {}).get("layers_0", {}).get("self_attention")
    if decode and first_cache is not None:
      position = first_cache["cache_index"]
      key_length = first_cache["cached_key"].shape[1]
      if length != 1:
        raise ValueError(f"Cached decoding takes one decoder token per call, got {length}.")
      if max_decode_length is not None and max_decode_length != key_length:
        raise ValueError(f"max_decode_length={max_decode_length} but the cache was created for "
                         f"{key_length} positions.")
      relpos_1xHx1xS = relpos(1, key_length, query_offset=position)
      # Only positions written so far (up to and including this one) may be attended to.
      self_mask_1x1x1xS = (jnp.arange(key_length) <= position)[None, None, None, :]
      self_bias_BxHxTxS = relpos_1xHx1xS + _mask_to_bias(self_mask_1x1x1xS)
    else:
      relpos_1xHxTxT = relpos(length, length)
      self_mask_1x1xTxT = jnp.tril(jnp.ones((length, length), bool))[None, None]
      if decoder_target_tokens is not None and not decode:
        # t5x semantics: padding target positions are not attended to. With right padding the
        # causal mask alone already keeps them out of every non-padding position.
        self_mask_1x1xTxT = self_mask_1x1xTxT & (decoder_target_tokens > 0)[:, None, None, :]
      self_bias_BxHxTxS = relpos_1xHxTxT + _mask_to_bias(self_mask_1x1xTxT)
    cross_bias_Bx1x1xL = _mask_to_bias((encoder_tokens_BxL > 0)[:, None, None, :])

    y_BxTxD = self.shared_embedding(decoder_tokens_BxT)
    y_BxTxD = Dropout(cfg.dropout_rate)(y_BxTxD, deterministic=not enable_dropout)
    y_BxTxD = nn.with_logical_constraint(y_BxTxD, ("batch", "length", "embed"))
    for i in range(cfg.num_decoder_layers):
      y_BxTxD = DecoderLayer(cfg, name=f"layers_{i}")(
          y_BxTxD, encoded_BxLxD, self_bias_BxHxTxS, cross_bias_Bx1x1xL, enable_dropout, decode,
          cross_kv=None if cross_kv is None else cross_kv[i])
    y_BxTxD = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="decoder_norm")(y_BxTxD)
    y_BxTxD = Dropout(cfg.dropout_rate)(y_BxTxD, deterministic=not enable_dropout)
    return nn.with_logical_constraint(y_BxTxD, ("batch", "length", "embed"))


class Transformer(nn.Module):
  """T5 encoder-decoder with the t5x `Transformer` interface.

  Token id 0 is padding (attention masks come from `tokens > 0`) and also the decoder start
  token. Dropout uses the 'dropout' rng.

  Incremental decoding (t5x recipe): create a zeroed cache by running the decoder once at full
  length with `decode=True`,

    _, variables = model.apply({'params': params}, encoded, encoder_input_tokens,
                               jnp.zeros((batch, max_decode_length), jnp.int32),
                               decode=True, enable_dropout=False, mutable=['cache'],
                               method=model.decode)
    cache = variables['cache']

  (or `model.init(..., decode=True)` from scratch), then feed one token per call:

    logits_Bx1xV, variables = model.apply({'params': params, 'cache': cache}, encoded,
                                          encoder_input_tokens, tokens_Bx1, decode=True,
                                          enable_dropout=False, mutable=['cache'],
                                          method=model.decode)

  Every decoder self-attention layer holds `cached_key`/`cached_value` [B, max_len, H, K]
  (batch-leading: expand or gather them per beam) and a scalar `cache_index`; step i uses the
  relative position bias of query position i. At most max_len steps fit (later writes clamp to
  the last slot). Cross-attention keys are recomputed from `encoded` each step, unless
  `cross_attention_kv(encoded)` computed them once and `decode(..., cross_kv=...)` reuses them.
  The encoder batch (of `encoded`/`cross_kv` and `encoder_input_tokens`) may divide the decoder
  batch: decoder row i then reads encoder row i // (decoder batch / encoder batch), so the beams
  of a query share that query's encoder states and cross-attention keys without copies.
  """

  config: T5Config

  def setup(self):
    cfg = self.config
    unknown = [a for a in cfg.mlp_activations if a not in _ACTIVATIONS]
    if unknown:
      raise ValueError(f"Unknown mlp_activations {unknown}; known: {sorted(_ACTIVATIONS)}.")
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)
    if not cfg.logits_via_embedding:
      self.logits_dense = DenseGeneral(features=(cfg.vocab_size,), kernel_axes=("embed", "vocab"),
                                       dtype=jnp.float32)

  def encode(self, encoder_input_tokens: jax.Array, enable_dropout: bool = True) -> jax.Array:
    """Runs the encoder.

    Args:
      encoder_input_tokens: int [B, L], 0 = padding.
      enable_dropout: apply dropout (needs a 'dropout' rng).

    Returns:
      encoded_BxLxD in the compute dtype (after the final layer norm).
    """
    if encoder_input_tokens.ndim != 2:
      raise ValueError(f"encoder_input_tokens must be [batch, length], got "
                       f"{encoder_input_tokens.shape}.")
    return self.encoder(encoder_input_tokens, enable_dropout)

  def cross_attention_kv(self, encoded: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Every decoder layer's cross-attention (key, value), each [B, L, H, K], for `decode`."""
    return self.decoder(encoded, None, None, None, False, False, None, cross_kv_only=True)

  def decode(self, encoded: jax.Array | None, encoder_input_tokens: jax.Array,
             decoder_input_tokens: jax.Array, enable_dropout: bool = True, decode: bool = False,
             max_decode_length: int | None = None, return_hidden: bool = False,
             decoder_target_tokens: jax.Array | None = None,
             cross_kv: tuple[tuple[jax.Array, jax.Array], ...] | None = None):
    """Runs the decoder and the LM head.

    Args:
      encoded: [B, L, D] output of `encode` (unused, may be None, when `cross_kv` is given).
      encoder_input_tokens: int [B, L]; only its padding (0) is used, to mask cross-attention.
      decoder_input_tokens: int [B, T], starting with 0 (the start token); [B, 1] per cached step.
      enable_dropout: apply dropout (needs a 'dropout' rng).
      decode: use the autoregressive cache (see the class docstring).
      max_decode_length: optional check that a cached step matches the cache length.
      return_hidden: also return the decoder's final hidden states.
      decoder_target_tokens: optional int [B, T]; padding targets (0) are masked as keys of the
        decoder self-attention (t5x). Unused with `decode=True`.
      cross_kv: optional `cross_attention_kv(encoded)`, used instead of projecting `encoded`.

    Returns:
      logits_BxTxV (float32), or (logits_BxTxV, hidden_BxTxD) if `return_hidden`. hidden is the
      final layer norm output (after dropout) before the tied head's emb_dim**-0.5 rescale, so
      `logits_from_hidden(hidden) == logits`.
    """
    hidden_BxTxD = self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                                decoder_target_tokens, enable_dropout, decode, max_decode_length,
                                cross_kv=cross_kv)
    logits_BxTxV = self.logits_from_hidden(hidden_BxTxD)
    return (logits_BxTxV, hidden_BxTxD) if return_hidden else logits_BxTxV

  def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array,
               decoder_target_tokens: jax.Array | None = None, enable_dropout: bool = True,
               decode: bool = False) -> jax.Array:
    """Encodes and decodes; returns logits_BxTxV (float32).

    Args:
      encoder_input_tokens: int [B, L], 0 = padding.
      decoder_input_tokens: int [B, T], the targets shifted right with a leading 0.
      decoder_target_tokens: optional int [B, T], see `decode`.
      enable_dropout: apply dropout (needs a 'dropout' rng).
      decode: use the autoregressive cache (see the class docstring).
    """
    encoded_BxLxD = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
    return self.decode(encoded_BxLxD, encoder_input_tokens, decoder_input_tokens,
                       enable_dropout=enable_dropout, decode=decode,
                       decoder_target_tokens=decoder_target_tokens)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """The shared token embeddings of `tokens` ([..., D], compute dtype, no scaling)."""
    return self.token_embedder(tokens)

  def lm_head(self) -> jax.Array:
    """The LM head as one float32 matrix [D, V]: `logits_from_hidden(h)` is `h @ lm_head()`
    (up to rounding), for losses that score hidden rows themselves
    (`losses.chunked_token_cross_entropy`)."""
    cfg = self.config
    if cfg.logits_via_embedding:
      return self.token_embedder.embedding.T * cfg.emb_dim**-0.5
    return nn.unbox(self.logits_dense.variables["params"]["kernel"]).astype(jnp.float32)

  def logits_from_hidden(self, hidden_BxTxD: jax.Array) -> jax.Array:
    """Scores decoder hidden states with the LM head; returns float32 logits [B, T, V]."""
    cfg = self.config
    if cfg.logits_via_embedding:
      # Tied head: T5 v1.0 (and HF) scale the decoder output by emb_dim**-0.5 first.
      scaled_BxTxD = hidden_BxTxD.astype(jnp.float32) * cfg.emb_dim**-0.5
      logits_BxTxV = self.token_embedder.attend(scaled_BxTxD)
    else:
      logits_BxTxV = self.logits_dense(hidden_BxTxD.astype(jnp.float32))
    return nn.with_logical_constraint(logits_BxTxV, ("batch", "length", "vocab"))
