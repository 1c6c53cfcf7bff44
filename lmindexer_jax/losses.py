"""The indexer's loss terms, as pure functions returning `(scalar loss, metrics)`.

* `reconstruction_loss`: token cross-entropy of the reconstructor's rows under the LM head
  (all positions), scored in cache-sized chunks (`chunked_token_cross_entropy`).
* `in_batch_contrastive_loss`: SimCSE between two dropout views, in-batch negatives: the whole
  batch at position 1, the same-prefix siblings in the batch after it.
* `commitment_loss`: the reference's "commitment": cross-entropy of the indexer's decoder logits
  on the codes already assigned at the earlier positions, each within its own ID-token slice.
* `code_commitment_loss`: cross-entropy of the quantizer's logits on the codes a document must
  keep, the softmax quantizer's counterpart of VQ-VAE's commitment term (not in the reference).

Every mean is over the whole (global) batch: under `jit` with a batch-sharded input the sums are
global, so negatives and normalisers span all devices (the reference's are per device).
The indexer weights and sums these terms in one place and puts every metric in its dict.

Shape letters: B batch, L document length, V vocab, D emb_dim,
T decoder length, P previous ID positions (t - 1 at position t), C tokens per chunk.
"""

from collections.abc import Sequence
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
  from lmindexer_jax.vocabularies import IdLayout

# Logit of a masked candidate: exp() underflows to exactly 0 in float32.
_NEG_INF = -1e10

Metrics = dict[str, jax.Array]


def _weighted_mean(values_B: jax.Array, weights_B: jax.Array) -> jax.Array:
  return jnp.sum(values_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1e-9)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))


def token_cross_entropy(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean cross-entropy, accuracy, total weight) over weighted target tokens.

  The one definition of token cross-entropy: the seq2seq loss (`models.py`) and the
  reconstruction loss both use it. A token is correct when its target's logit is the largest
  (a tie counts): the argmax's accuracy but for ties, without the argmax, which XLA:CPU runs as
  an unvectorised (value, index) reduction (19 of 159 ms of the indexer's position-2 step at
  V = 2124 in one profile). Means are 0 when no token has weight.
  """
  weights_BxL = weights_BxL.astype(jnp.float32)
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], -1)[..., 0]
  correct_BxL = (target_BxL >= jnp.max(logits_BxLxV, axis=-1)).astype(jnp.float32)
  return (_weighted_mean(ce_BxL, weights_BxL), _weighted_mean(correct_BxL, weights_BxL),
          jnp.sum(weights_BxL))


def chunked_token_cross_entropy(
    hidden_BxLxD: jax.Array, head_DxV: jax.Array, targets_BxL: jax.Array,
    weights_BxL: jax.Array, *, max_chunk_logits: int = 2**20,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_cross_entropy(hidden @ head, ...)` without the [B, L, V] logits in memory.

  The logits are built, reduced and (in the backward pass) rebuilt one chunk of token columns
  at a time, at most `max_chunk_logits` of them per chunk, so they stay in cache: otherwise the
  full-vocabulary softmax streams several [B, L, V] float32 arrays through memory (on CPU its
  gradient took 127 ms against 37 ms chunked, `benchmarks/indexer_step.py`); with T5's 32k
  vocabulary, 512 tokens and 64 documents each such array is about 4 GiB. Chunks run along L,
  so a batch-sharded input stays sharded.

  Returns:
    (mean cross-entropy, accuracy, total weight) over weighted tokens, as `token_cross_entropy`.
  """
  batch, length, _ = hidden_BxLxD.shape
  vocab = head_DxV.shape[1]
  chunk = max(1, min(length, max_chunk_logits // max(batch * vocab, 1)))
  pad = -length % chunk
  hidden_BxLxD = jnp.pad(hidden_BxLxD.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
  targets_BxL = jnp.pad(targets_BxL.astype(jnp.int32), ((0, 0), (0, pad)))
  nll_BxL, correct_BxL = _chunked_nll(hidden_BxLxD, head_DxV.astype(jnp.float32),
                                      targets_BxL, chunk)
  weights_BxL = weights_BxL.astype(jnp.float32)
  return (_weighted_mean(nll_BxL[:, :length], weights_BxL),
          _weighted_mean(correct_BxL[:, :length].astype(jnp.float32), weights_BxL),
          jnp.sum(weights_BxL))


def _by_chunk(x_BxL, chunk):
  """[B, L, ...] -> [L / chunk, B, chunk, ...]: the scanned axis first, B kept whole."""
  batch, length = x_BxL.shape[:2]
  x = x_BxL.reshape(batch, length // chunk, chunk, *x_BxL.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_chunks(x):
  """[L / chunk, B, chunk, ...] -> [B, L, ...], `_by_chunk` undone."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(hidden_BxLxD, head_DxV, targets_BxL, chunk):
  """Per-token negative log-likelihood of `hidden @ head` and whether the target's logit is
  the largest (`token_cross_entropy`'s accuracy), chunk by chunk."""
  return _chunked_nll_fwd(hidden_BxLxD, head_DxV, targets_BxL, chunk)[0]


def _chunked_nll_fwd(hidden_BxLxD, head_DxV, targets_BxL, chunk):
  def step(_, xs):
    h_BxCxD, t_BxC = xs
    logits_BxCxV = h_BxCxD @ head_DxV
    target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], -1)[..., 0]
    max_BxC = jnp.max(logits_BxCxV, axis=-1)
    nll_BxC = max_BxC + jnp.log(jnp.sum(jnp.exp(logits_BxCxV - max_BxC[..., None]), axis=-1)
                                ) - target_BxC
    return None, (nll_BxC, target_BxC >= max_BxC)

  _, (nll, correct) = jax.lax.scan(
      step, None, (_by_chunk(hidden_BxLxD, chunk), _by_chunk(targets_BxL, chunk)))
  return (_from_chunks(nll), _from_chunks(correct)), (hidden_BxLxD, head_DxV, targets_BxL)


def _chunked_nll_bwd(chunk, residuals, cotangents):
  hidden_BxLxD, head_DxV, targets_BxL = residuals
  g_nll_BxL = cotangents[0]

  def step(d_head_DxV, xs):
    h_BxCxD, t_BxC, g_BxC = xs
    probs_BxCxV = jax.nn.softmax(h_BxCxD @ head_DxV, axis=-1)
    d_logits_BxCxV = (probs_BxCxV - jax.nn.one_hot(t_BxC, head_DxV.shape[1])) * g_BxC[..., None]
    d_head_DxV += jnp.einsum("bcd,bcv->dv", h_BxCxD, d_logits_BxCxV)
    return d_head_DxV, d_logits_BxCxV @ head_DxV.T

  d_head_DxV, d_hidden = jax.lax.scan(
      step, jnp.zeros_like(head_DxV),
      (_by_chunk(hidden_BxLxD, chunk), _by_chunk(targets_BxL, chunk),
       _by_chunk(g_nll_BxL, chunk)))
  return _from_chunks(d_hidden), d_head_DxV, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def reconstruction_loss(hidden_BxLxD: jax.Array, head_DxV: jax.Array, tokens_BxL: jax.Array,
                        weights_BxL: jax.Array) -> tuple[jax.Array, Metrics]:
  """Mean token cross-entropy over weighted tokens, and token accuracy.

  Args:
    hidden_BxLxD: the reconstructor's row for each document token.
    head_DxV: the LM head as one matrix (`t5.Transformer.lm_head`): logits = hidden @ head.
    tokens_BxL: int target tokens (the document itself).
    weights_BxL: 0/1 (or real) weights; use `reconstructor.target_mask` (non-pad, non-EOS).

  Returns:
    (loss, {reconstruction_loss, reconstruction_accuracy, reconstruction_tokens}); the loss is
    the weighted mean over all tokens of the batch (0 if there are none).
  """
  loss, accuracy, num_tokens = chunked_token_cross_entropy(
      hidden_BxLxD, head_DxV, tokens_BxL, weights_BxL)
  return loss, {
      "reconstruction_loss": loss,
      "reconstruction_accuracy": accuracy,
      "reconstruction_tokens": num_tokens,
  }


def in_batch_contrastive_loss(
    q_BxD: jax.Array, k_BxD: jax.Array, *, temperature: float = 1.0, normalize: bool = False,
    weights_B: jax.Array | None = None, groups_BxP: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """SimCSE: row b's positive is k_b (the same doc under other dropout), negatives the other k's.

  `scores = q k^T / temperature`, cross-entropy with the diagonal as target, mean over rows. The
  defaults (raw dot product, temperature 1, no normalisation) reproduce the reference. Unlike
  the reference, the negatives are the whole global batch when the batch is sharded under jit.
  With `groups_BxP` (the ID prefixes at position > 1) the negatives are the rows of the same
  group only: same-prefix siblings, which the input pipeline batches together
  (`siblings.grouped_order`). A row alone in its group is left out (the reference scores such
  documents against copies of themselves).

  Args:
    q_BxD: first view of each doc.
    k_BxD: second view, same order.
    temperature: divides the scores.
    normalize: cosine scores (L2-normalised q and k) instead of dot products.
    weights_B: optional row weights; a row with weight 0 (batch padding) is neither a query nor
      a negative.
    groups_BxP: optional int group of each row, [B] or [B, P] (rows are in one group iff all P
      entries are equal).

  Returns:
    (loss, {contrastive_loss, contrastive_accuracy} and, with groups, contrastive_rows_used: the
    weighted share of rows with at least one negative); accuracy = share of rows whose positive
    scores highest.
  """
  q_BxD, k_BxD = q_BxD.astype(jnp.float32), k_BxD.astype(jnp.float32)
  if normalize:
    q_BxD, k_BxD = _l2_normalize(q_BxD), _l2_normalize(k_BxD)
  scores_BxB = jnp.einsum("qd,kd->qk", q_BxD, k_BxD) / temperature
  batch = q_BxD.shape[0]
  if weights_B is None:
    weights_B = jnp.ones((batch,), jnp.float32)
  weights_B = all_weights_B = weights_B.astype(jnp.float32)
  allowed_BxB = jnp.broadcast_to(weights_B[None, :] > 0, scores_BxB.shape)
  metrics = {}
  if groups_BxP is not None:
    groups_BxP = groups_BxP.reshape(batch, -1)
    allowed_BxB &= jnp.all(groups_BxP[:, None, :] == groups_BxP[None, :, :], axis=-1)
    others_B = jnp.sum(allowed_BxB, axis=-1) - (weights_B > 0)
    weights_B = jnp.where(others_B > 0, weights_B, 0.0)
    metrics["contrastive_rows_used"] = jnp.sum(weights_B) / jnp.maximum(
        jnp.sum(all_weights_B), 1e-9)
  targets_B = jnp.arange(batch)
  scores_BxB = jnp.where(allowed_BxB | (targets_B[:, None] == targets_B[None, :]), scores_BxB,
                         _NEG_INF)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(scores_BxB, targets_B)
  correct_B = (jnp.argmax(scores_BxB, axis=-1) == targets_B).astype(jnp.float32)
  loss = _weighted_mean(ce_B, weights_B)
  return loss, {"contrastive_loss": loss,
                "contrastive_accuracy": _weighted_mean(correct_B, weights_B), **metrics}


def commitment_loss(
    logits_BxTxV: jax.Array, prev_codes_BxP: jax.Array,
    layout: "IdLayout | Sequence[tuple[int, int]]", *, weights_B: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """Cross-entropy of the indexer's decoder on the codes already assigned (position t > 1).

  The decoder input at position t is `[0, <id_0_c1>, ..., <id_(t-2)_c(t-1)>]`; its logits at
  decoder position p < t - 1 predict code c_(p+1) of ID position p. Each is scored only within
  position p's own ID-token slice `[start, end)` of the vocabulary, so logits elsewhere (text
  tokens, other positions) are ignored. This keeps the LM able to regenerate the earlier codes
  while position t is trained (the reference's "commitment" loss, not the VQ-VAE one).

  Args:
    logits_BxTxV: decoder logits, T >= P (only the first P positions are read).
    prev_codes_BxP: int codes c_1..c_P, each in [0, size of its position).
    layout: an `IdLayout` (its `position_range(p)`) or the P `(start, end)` token ranges.
    weights_B: optional row weights (0 = batch padding).

  Returns:
    (loss, {commitment_loss, commitment_accuracy}): the mean over rows and positions; 0 when
    P = 0 (position 1).
  """
  num_prev = prev_codes_BxP.shape[1]
  if num_prev == 0:
    zero = jnp.zeros((), jnp.float32)
    return zero, {"commitment_loss": zero, "commitment_accuracy": zero}
  if logits_BxTxV.shape[1] < num_prev:
    raise ValueError(f"{num_prev} previous codes but only {logits_BxTxV.shape[1]} logit "
                     f"positions.")
  if hasattr(layout, "position_range"):
    ranges = [layout.position_range(p) for p in range(num_prev)]
  else:
    ranges = [tuple(r) for r in layout][:num_prev]
    if len(ranges) < num_prev:
      raise ValueError(f"{num_prev} previous codes but {len(ranges)} position ranges.")
  batch = logits_BxTxV.shape[0]
  if weights_B is None:
    weights_B = jnp.ones((batch,), jnp.float32)
  weights_B = weights_B.astype(jnp.float32)
  ce, correct = [], []
  # A loop over the (few, static) positions: slices may have different sizes.
  for p, (start, end) in enumerate(ranges):
    slice_BxK = logits_BxTxV[:, p, start:end].astype(jnp.float32)
    codes_B = prev_codes_BxP[:, p]
    ce.append(optax.softmax_cross_entropy_with_integer_labels(slice_BxK, codes_B))
    correct.append((jnp.argmax(slice_BxK, axis=-1) == codes_B).astype(jnp.float32))
  ce_BxP, correct_BxP = jnp.stack(ce, axis=1), jnp.stack(correct, axis=1)
  loss = _weighted_mean(jnp.mean(ce_BxP, axis=1), weights_B)
  return loss, {"commitment_loss": loss,
                "commitment_accuracy": _weighted_mean(jnp.mean(correct_BxP, axis=1), weights_B)}


def code_commitment_loss(logits_BxK: jax.Array, codes_B: jax.Array) -> tuple[jax.Array, Metrics]:
  """Cross-entropy of the quantizer's logits h.E on the codes a document must keep.

  VQ-VAE's commitment term pulls h towards its codeword; this is the same pull for the
  straight-through softmax quantizer: towards E[code] and away from the other codewords, strong
  only where the code is not already the confident choice. The straight-through gradient is
  non-zero only near a boundary (elsewhere the softmax is one-hot), so without this term the
  few documents there drive the updates of the shared encoder, every h moves, and codes
  drift. The codes are the k-means clusters the quantized stage starts from (or the current
  argmax), held constant.

  Returns:
    (loss, {code_commitment_loss, code_confidence, code_accuracy}): means over the rows; the
    confidence is the softmax probability of the code, the accuracy how often it is the argmax.
  """
  logits_BxK = logits_BxK.astype(jnp.float32)
  codes_B = jax.lax.stop_gradient(codes_B).astype(jnp.int32)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxK, codes_B))
  chosen_B = jnp.take_along_axis(jax.nn.softmax(logits_BxK, axis=-1), codes_B[:, None], 1)[:, 0]
  accuracy = jnp.mean((jnp.argmax(logits_BxK, axis=-1) == codes_B).astype(jnp.float32))
  return loss, {"code_commitment_loss": loss, "code_confidence": jnp.mean(chosen_B),
                "code_accuracy": accuracy}
