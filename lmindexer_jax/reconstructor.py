"""The reconstructor: a shallow non-causal T5 block stack that rebuilds a document from its ID.

At ID position t the keys/values are S = C + L vectors: the C = t ID slots (the embeddings of the
previous codes c_1..c_(t-1), then the quantized, or in the no-codebook stage continuous, h_t),
followed by the document's own token embeddings. Each document token i gets one query row that
carries only ID information, and attends to every ID slot and to a random subset of the OTHER
tokens, never to itself: to predict token i the model must use the ID (RetroMAE-style "enhanced
decoding", as the reference's `reconstruct_decoder.py`). The caller scores the returned hidden
states with `losses.reconstruction_loss` under `t5.Transformer.lm_head`.

Shape letters: B batch, L document length, C ID slots, S = C + L keys, D emb_dim, H heads,
M query rows (C * L in 'streams' mode).
"""

from collections.abc import Sequence

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from lmindexer_jax import t5

# T5's SentencePiece layout (`vocabularies.PAD_ID` / `EOS_ID`), repeated here so model code does
# not import TensorFlow through `vocabularies`.
PAD_ID = 0
EOS_ID = 1
# Masked attention logits get this bias, as in `t5`: exp() of it is exactly 0 in float32, so a
# masked key has exactly zero weight and zero gradient.
_NEG_INF = -1e10

STREAMS = "streams"
SUM = "sum"


@struct.dataclass
class ReconstructorConfig:
  """Hyperparameters of the reconstructor; `None` takes the value from the indexer's T5 config.

  Attributes:
    num_layers: blocks in the stack (the reference: 1).
    num_heads, head_dim, mlp_dim, dropout_rate: per block, default the T5 config's (the
      reference builds its block from the t5-base config).
    query_mode: how the C ID slots make the query of each token row.
      'streams' (the reference): one query stream per ID slot, each slot's vector repeated at
      every row, run through the stack independently; the C outputs are summed.
      'sum': a single stream whose query is the sum of the C slot vectors (C times cheaper).
      Identical when C = 1.
    leak_continuous_query: the reference's behaviour at t > 1: the query stream of the last slot
      uses the continuous h_t (`continuous_h_BxD`) rather than the quantized one, so
      un-quantized information reaches the reconstruction (bug 5 in the reference notes). Kept
      only for comparison; no effect when C = 1 (the reference's t = 1 query is quantized).
    special_ids: token ids never attended to as keys nor reconstructed (EOS); padding (0) is
      always excluded as well.
  """

  num_layers: int = 1
  num_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  dropout_rate: float | None = None
  query_mode: str = STREAMS
  leak_continuous_query: bool = False
  special_ids: tuple[int, ...] = (EOS_ID,)


def target_mask(doc_tokens_BxL: jax.Array, special_ids: Sequence[int] = (EOS_ID,)) -> jax.Array:
  """bool [B, L]: the tokens that are reconstructed and may be attended to (not pad, not special).

  Also the weights of `losses.reconstruction_loss`.
  """
  valid_BxL = doc_tokens_BxL != PAD_ID
  for special in special_ids:
    valid_BxL = valid_BxL & (doc_tokens_BxL != special)
  return valid_BxL


def structural_mask(doc_tokens_BxL: jax.Array, num_id_slots: int,
                    special_ids: Sequence[int] = (EOS_ID,)) -> jax.Array:
  """bool [B, L, C + L]: the evaluation mask, everything a row may ever attend to.

  ID slots always; document keys that are neither padding nor special; never the row's own token.
  """
  length = doc_tokens_BxL.shape[1]
  key_ok_Bx1xL = target_mask(doc_tokens_BxL, special_ids)[:, None, :]
  not_self_1xLxL = ~jnp.eye(length, dtype=bool)[None]
  doc_BxLxL = key_ok_Bx1xL & not_self_1xLxL
  ids_BxLxC = jnp.ones(doc_BxLxL.shape[:2] + (num_id_slots,), bool)
  return jnp.concatenate([ids_BxLxC, doc_BxLxL], axis=-1)


def sample_reconstruction_mask(
    rng: jax.Array | None, doc_tokens_BxL: jax.Array, num_id_slots: int,
    mask_ratio: float | jax.Array, special_ids: Sequence[int] = (EOS_ID,),
) -> jax.Array:
  """Samples which keys each token row may attend to; jit-friendly, on device.

  Every (row, document key) pair is kept with probability 1 - `mask_ratio`, independently (the
  reference draws each row's mask from a pool of 256 pre-sampled ones, on the host). Then the
  diagonal (a token never sees itself), padding and special keys are forced off and the ID slots
  forced on (`structural_mask`). With `rng=None` or `mask_ratio=0` it is the evaluation mask.

  Args:
    rng: PRNG key, or None for the deterministic evaluation mask.
    doc_tokens_BxL: int document tokens, 0 = padding.
    num_id_slots: C.
    mask_ratio: probability that a document key is hidden from a row (the reference's
      `decoder_mlm_probability`: 0.5 at position 1, 0.7 after).
    special_ids: keys that are always hidden (EOS).

  Returns:
    bool [B, L, C + L], True = row may attend to key.
  """
  mask_BxLxS = structural_mask(doc_tokens_BxL, num_id_slots, special_ids)
  if rng is None:
    return mask_BxLxS
  batch, length = doc_tokens_BxL.shape
  keep_BxLxL, _ = t5.bernoulli_keep(rng, 1.0 - jnp.asarray(mask_ratio, jnp.float32),
                                     (batch, length, length))
  ids_BxLxC = jnp.ones((batch, length, num_id_slots), bool)
  return mask_BxLxS & jnp.concatenate([ids_BxLxC, keep_BxLxL], axis=-1)


class ReconstructorLayer(nn.Module):
  """Pre-norm cross-attention of the query stream into the fixed K/V stream, then the MLP.

  `q = q + Dropout(Attn(LN(q), LN'(kv)))`, `q = q + Dropout(Mlp(LN(q)))`. The K/V stream is the
  same input embeddings at every layer; only the query stream is updated (the reference's
  two-stream T5Stack; with its single layer the two readings coincide). Separate layer norms for
  the query and the K/V stream: they carry vectors of different scales.
  """

  config: t5.T5Config

  @nn.compact
  def __call__(self, q_BxMxD, kv_BxSxD, bias_BxHxMxS, enable_dropout):
    cfg = self.config
    y_BxMxD = t5.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_attention_layer_norm")(
        q_BxMxD)
    kv_BxSxD = t5.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="kv_layer_norm")(kv_BxSxD)
    y_BxMxD = t5.MultiHeadAttention(cfg, name="attention")(
        y_BxMxD, kv_BxSxD, bias_BxHxMxS, enable_dropout=enable_dropout)
    q_BxMxD = _residual(cfg, q_BxMxD, y_BxMxD, enable_dropout)
    y_BxMxD = t5.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(q_BxMxD)
    y_BxMxD = t5.MlpBlock(cfg, name="mlp")(y_BxMxD, enable_dropout)
    return _residual(cfg, q_BxMxD, y_BxMxD, enable_dropout)


def _residual(cfg: t5.T5Config, x, y, enable_dropout):
  y = t5.Dropout(cfg.dropout_rate)(y, deterministic=not enable_dropout)
  return nn.with_logical_constraint(x + y, ("batch", "length", "embed"))


class Reconstructor(nn.Module):
  """Rebuilds every document token from the ID (see the module docstring).

  Attributes:
    config: `ReconstructorConfig`.
    t5_config: the indexer's `T5Config`; emb_dim, dtype, layer-norm epsilon, activations and the
      relative-position buckets come from it, the rest unless overridden in `config`.
  """

  config: ReconstructorConfig
  t5_config: t5.T5Config

  def block_config(self) -> t5.T5Config:
    """The T5 config of one reconstructor block (the T5 building blocks take a `T5Config`)."""
    cfg, base = self.config, self.t5_config
    overrides = {name: getattr(cfg, name)
                 for name in ("num_heads", "head_dim", "mlp_dim", "dropout_rate")
                 if getattr(cfg, name) is not None}
    return base.replace(**overrides)

  @nn.compact
  def __call__(self, id_embs_BxCxD: jax.Array, doc_tokens_BxL: jax.Array,
               doc_embs_BxLxD: jax.Array, mask_BxLxS: jax.Array | None = None, *,
               enable_dropout: bool, continuous_h_BxD: jax.Array | None = None) -> jax.Array:
    """Returns hidden_BxLxD, the final-layer-norm output for each document token row.

    Args:
      id_embs_BxCxD: the C ID slots: embeddings of c_1..c_(t-1) (`Transformer.embed` of their ID
        tokens), then h_t (quantized, or continuous in the no-codebook stage).
      doc_tokens_BxL: int document tokens (0 = padding); their padding and specials are masked as
        keys whatever `mask_BxLxS` says.
      doc_embs_BxLxD: the document's token embeddings (`Transformer.embed(doc_tokens_BxL)`).
      mask_BxLxS: bool, True = may attend, from `sample_reconstruction_mask`; None = the
        evaluation mask. The diagonal is masked whatever it says.
      enable_dropout: apply dropout (needs a 'dropout' rng).
      continuous_h_BxD: the continuous h_t, only read with `leak_continuous_query` and C > 1.

    Returns:
      hidden_BxLxD in the compute dtype; score it with `Transformer.logits_from_hidden` (which
      applies the tied head's emb_dim**-0.5 rescale; the reference's reconstructor skips it, a
      constant factor on the logits).
    """
    cfg = self.config
    block_cfg = self.block_config()
    batch, num_slots, _ = id_embs_BxCxD.shape
    length = doc_tokens_BxL.shape[1]
    if cfg.query_mode not in (STREAMS, SUM):
      raise ValueError(f"Unknown query_mode {cfg.query_mode!r}; use {STREAMS!r} or {SUM!r}.")

    # Keys/values: [ID slots; document tokens], positions 0..S-1.
    kv_BxSxD = jnp.concatenate([id_embs_BxCxD.astype(block_cfg.dtype),
                                doc_embs_BxLxD.astype(block_cfg.dtype)], axis=1)
    kv_BxSxD = t5.Dropout(block_cfg.dropout_rate)(kv_BxSxD, deterministic=not enable_dropout)
    kv_BxSxD = nn.with_logical_constraint(kv_BxSxD, ("batch", "length", "embed"))

    # Query streams: one vector per stream, repeated at every token row.
    slots_BxCxD = jnp.asarray(id_embs_BxCxD)
    if cfg.leak_continuous_query and num_slots > 1:
      if continuous_h_BxD is None:
        raise ValueError("leak_continuous_query needs continuous_h_BxD.")
      slots_BxCxD = slots_BxCxD.at[:, -1].set(continuous_h_BxD.astype(slots_BxCxD.dtype))
    if cfg.query_mode == SUM:
      slots_BxCxD = jnp.sum(slots_BxCxD, axis=1, keepdims=True)
    num_streams = slots_BxCxD.shape[1]
    # Streams are stacked along the query rows: attention rows are independent, so stream j's
    # rows j*L .. (j+1)*L - 1 see exactly what a separate pass would.
    q_BxMxD = jnp.repeat(slots_BxCxD.astype(block_cfg.dtype), length, axis=1)
    q_BxMxD = t5.Dropout(block_cfg.dropout_rate)(q_BxMxD, deterministic=not enable_dropout)

    # Bias: T5 bidirectional relative positions over the S K/V positions; token row i sits at
    # position C + i (the reference's query stream is as long as the K/V stream).
    relpos_1xHxLxS = t5.RelativePositionBias(block_cfg, bidirectional=True, name="relpos_bias")(
        length, num_slots + length, query_offset=num_slots)
    allowed_BxLxS = structural_mask(doc_tokens_BxL, num_slots, cfg.special_ids)
    if mask_BxLxS is not None:
      allowed_BxLxS = allowed_BxLxS & mask_BxLxS
    bias_BxHxLxS = relpos_1xHxLxS + jnp.where(allowed_BxLxS, 0.0, _NEG_INF)[:, None]
    bias_BxHxMxS = jnp.tile(bias_BxHxLxS, (1, 1, num_streams, 1))

    for i in range(cfg.num_layers):
      q_BxMxD = ReconstructorLayer(block_cfg, name=f"layers_{i}")(
          q_BxMxD, kv_BxSxD, bias_BxHxMxS, enable_dropout)
    q_BxMxD = t5.LayerNorm(block_cfg.layer_norm_epsilon, block_cfg.dtype, name="final_norm")(
        q_BxMxD)
    q_BxMxD = t5.Dropout(block_cfg.dropout_rate)(q_BxMxD, deterministic=not enable_dropout)
    hidden_BxLxD = jnp.sum(q_BxMxD.reshape(batch, num_streams, length, -1), axis=1)
    return nn.with_logical_constraint(hidden_BxLxD, ("batch", "length", "embed"))
