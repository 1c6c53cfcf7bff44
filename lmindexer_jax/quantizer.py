"""Codebooks that turn a document representation into a discrete code (one ID position).

Two quantizers share one output type, `QuantizeOutput`:

* `straight_through_quantize` (the reference's `GBQuantize`, what LMIndexer trains with):
  dot-product logits against a trainable codebook in `params`, argmax code, straight-through
  softmax gradient, optional Gumbel noise.
* The EMA vector quantiser (VQ-VAE with exponential-moving-average codebook updates, the
  reference's unused `Quantize`): L2 nearest codeword, identity straight-through gradient,
  commitment loss, codebook statistics in the `codebook_ema` collection, updated only when the
  train step applies the module with `mutable=['codebook_ema']`.

`Quantizer` is the Flax module holding either codebook; `load_centers` / `codebook_of` move k-means
centres in and the codebook out of a variables tree; `fit_codebook` finds the straight-through
codebook whose argmax gives codes chosen elsewhere. `codebook_usage` gives usage statistics.

Shape letters: B batch, D emb_dim, K codebook size, N assigned rows (any number of docs).
"""

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

STRAIGHT_THROUGH = "straight_through"
EMA_VQ = "ema_vq"
EMA_COLLECTION = "codebook_ema"

# The reference initialises `GBQuantize.embed` with torch's xavier_normal_ on [K, D]; it is
# normally overwritten with k-means centres before training.
CODEBOOK_INIT = nn.initializers.xavier_normal()


@struct.dataclass
class QuantizeOutput:
  """What a quantizer returns for a batch of representations.

  Attributes:
    quantized_BxD: the codeword `E[codes]` in the forward pass, with a straight-through gradient
      to the input (and, for the softmax quantizer, to the codebook).
    codes_B: int32 assigned code per row.
    logits_BxK: float32 assignment scores (argmax = `codes_B` without Gumbel noise): dot products
      (or cosines) for the softmax quantizer, negative squared L2 distances for the EMA VQ.
    soft_BxD: the softmax mixture of codewords (softmax quantizer only, else None).
    vq_commitment_loss: float32 scalar, already weighted: the VQ-VAE term
      `weight * mean((h - sg(E[codes]))^2)` for the EMA VQ, 0 for the softmax quantizer (the
      reference returns a literal 0 there as well). Not `losses.commitment_loss`, which is the
      reference's other "commitment" (the decoder regenerating earlier codes).
  """

  quantized_BxD: jax.Array
  codes_B: jax.Array
  logits_BxK: jax.Array
  soft_BxD: jax.Array | None = None
  vq_commitment_loss: jax.Array | float = 0.0


# Why the straight-through softmax (`quantized = soft + sg(hard - soft)`):
#
# The code of a document is `argmax_k h.E_k`, and the reconstructor must see exactly that codeword
# E[code] (it is what the ID token's embedding becomes once the codebook is copied into the LM).
# argmax has no gradient, so the forward value is the hard codeword while the backward pass uses
# the gradient of the soft mixture `softmax(logits / tau) @ E`: `hard - soft` is a constant under
# `stop_gradient`, so d quantized = d soft. Both the encoder (through the logits) and the codebook
# (through the logits and the mixture) get gradients, which is why this codebook is an ordinary
# trainable parameter. The reference calls this "Gumbel softmax" but never samples noise (tau = 1,
# deterministic). Here Gumbel noise is added to the logits when `gumbel_rng` is given (the
# straight-through Gumbel-softmax estimator of Jang et al. 2017): both the code (argmax) and the
# soft mixture then use the noisy logits, so forward and backward see the same sample.
def straight_through_quantize(
    h_BxD: jax.Array,
    codebook_KxD: jax.Array,
    *,
    temperature: float = 1.0,
    gumbel_rng: jax.Array | None = None,
    gumbel_scale: float = 1.0,
    normalize: bool = False,
) -> QuantizeOutput:
  """Straight-through softmax quantization against a codebook.

  Args:
    h_BxD: representations to quantize.
    codebook_KxD: the codewords E.
    temperature: tau of `softmax(logits / tau)` (the reference fixes 1). Only affects gradients.
    gumbel_rng: if given, Gumbel(0, 1) noise times `gumbel_scale` is added to the logits before
      the argmax and the softmax; if None (evaluation, code assignment, the reference) the clean
      logits are used.
    gumbel_scale: multiplier of the Gumbel noise.
    normalize: use cosine logits (L2-normalised h and E) instead of the reference's raw dot
      product. The mixed and returned codewords are the un-normalised rows of E either way.

  Returns:
    `QuantizeOutput`: `logits_BxK` are the clean (noise-free) float32 logits; `codes_B` is the
    argmax of the logits actually used (noisy when `gumbel_rng` is given).
  """
  h_BxD = h_BxD.astype(jnp.float32)
  codebook_KxD = codebook_KxD.astype(jnp.float32)
  if normalize:
    logits_BxK = jnp.einsum("bd,kd->bk", _l2_normalize(h_BxD), _l2_normalize(codebook_KxD))
  else:
    logits_BxK = jnp.einsum("bd,kd->bk", h_BxD, codebook_KxD)
  noisy_BxK = logits_BxK
  if gumbel_rng is not None:
    noisy_BxK = logits_BxK + gumbel_scale * jax.random.gumbel(gumbel_rng, logits_BxK.shape)
  codes_B = jnp.argmax(noisy_BxK, axis=-1).astype(jnp.int32)
  probs_BxK = jax.nn.softmax(noisy_BxK / temperature, axis=-1)
  soft_BxD = jnp.einsum("bk,kd->bd", probs_BxK, codebook_KxD)
  hard_BxD = jnp.take(codebook_KxD, codes_B, axis=0)
  quantized_BxD = soft_BxD + jax.lax.stop_gradient(hard_BxD - soft_BxD)
  return QuantizeOutput(quantized_BxD, codes_B, logits_BxK, soft_BxD,
                        jnp.zeros((), jnp.float32))


def nearest_codeword_quantize(
    h_BxD: jax.Array, codebook_KxD: jax.Array, *, commitment_weight: float = 0.25,
    weights_B: jax.Array | None = None,
) -> QuantizeOutput:
  """VQ-VAE quantization: nearest codeword in L2, identity straight-through gradient.

  The codebook gets no gradient (it is stop-gradiented: an EMA codebook is updated from
  assignment statistics instead). `vq_commitment_loss = weight * mean((h - sg(E[codes]))^2)`
  pulls the encoder towards its codeword, averaged over the rows with `weights_B > 0` (all by
  default).
  """
  h_BxD = h_BxD.astype(jnp.float32)
  codebook_KxD = jax.lax.stop_gradient(codebook_KxD.astype(jnp.float32))
  # ||h - e||^2 = ||h||^2 - 2 h.e + ||e||^2; the logits are its negation.
  dist_BxK = (jnp.sum(jnp.square(h_BxD), axis=-1, keepdims=True)
              - 2.0 * jnp.einsum("bd,kd->bk", h_BxD, codebook_KxD)
              + jnp.sum(jnp.square(codebook_KxD), axis=-1)[None, :])
  codes_B = jnp.argmin(dist_BxK, axis=-1).astype(jnp.int32)
  hard_BxD = jnp.take(codebook_KxD, codes_B, axis=0)
  quantized_BxD = h_BxD + jax.lax.stop_gradient(hard_BxD - h_BxD)
  if weights_B is None:
    weights_B = jnp.ones(h_BxD.shape[:1], jnp.float32)
  weights_B = weights_B.astype(jnp.float32)
  sq_err_B = jnp.mean(jnp.square(h_BxD - hard_BxD), axis=-1)
  commitment = commitment_weight * jnp.sum(weights_B * sq_err_B) / jnp.maximum(
      jnp.sum(weights_B), 1.0)
  return QuantizeOutput(quantized_BxD, codes_B, -dist_BxK, None, commitment)


def ema_codebook_update(
    h_BxD: jax.Array, codes_B: jax.Array, codebook_KxD: jax.Array, cluster_size_K: jax.Array,
    embed_sum_KxD: jax.Array, *, decay: float, epsilon: float,
    weights_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One VQ-VAE EMA step: returns the new (codebook_KxD, cluster_size_K, embed_sum_KxD).

  `cluster_size` and `embed_sum` are moving averages of each code's assignment count and of the
  sum of its assigned vectors; a code assigned in this batch gets their ratio, the moving
  average of its assigned vectors (van den Oord et al. 2017, appendix). A code not assigned in
  this batch keeps its codeword: both averages decay by the same factor, so the ratio would be
  unchanged anyway. (sonnet's `VectorQuantizerEMA` instead Laplace-smooths the counts, which
  shrinks a long-unused codeword towards zero once its decayed count nears epsilon; here
  epsilon only floors the divisor.) Under `jit` with a sharded batch the sums below are already
  global: no `psum` needed.
  """
  num_codes = cluster_size_K.shape[0]
  onehot_BxK = jax.nn.one_hot(codes_B, num_codes, dtype=jnp.float32)
  if weights_B is not None:
    onehot_BxK = onehot_BxK * weights_B.astype(jnp.float32)[:, None]
  h_BxD = jax.lax.stop_gradient(h_BxD.astype(jnp.float32))
  counts_K = jnp.sum(onehot_BxK, axis=0)
  sums_KxD = jnp.einsum("bk,bd->kd", onehot_BxK, h_BxD)
  cluster_size_K = decay * cluster_size_K + (1.0 - decay) * counts_K
  embed_sum_KxD = decay * embed_sum_KxD + (1.0 - decay) * sums_KxD
  means_KxD = embed_sum_KxD / jnp.maximum(cluster_size_K, epsilon)[:, None]
  codebook_KxD = jnp.where((counts_K > 0)[:, None], means_KxD, codebook_KxD)
  return codebook_KxD, cluster_size_K, embed_sum_KxD


@struct.dataclass
class QuantizerConfig:
  """Hyperparameters of one ID position's codebook.

  Attributes:
    codebook_size: K.
    emb_dim: D, the indexer's d_model.
    kind: 'straight_through' (softmax straight-through, codebook in `params`; the reference) or
      'ema_vq' (VQ-VAE with an EMA codebook in the `codebook_ema` collection).
    temperature: softmax temperature of the straight-through quantizer.
    gumbel_scale: scale of the Gumbel noise, sampled only when a `gumbel_rng` is passed.
    normalize: cosine instead of dot-product logits (straight-through quantizer).
    ema_decay: EMA decay of the VQ codebook statistics.
    ema_epsilon: floor of the EMA cluster sizes when dividing.
    commitment_weight: beta of the VQ-VAE commitment loss (EMA VQ only).
  """

  codebook_size: int
  emb_dim: int
  kind: str = STRAIGHT_THROUGH
  temperature: float = 1.0
  gumbel_scale: float = 1.0
  normalize: bool = False
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5
  commitment_weight: float = 0.25


class Quantizer(nn.Module):
  """One ID position's codebook E [K, D] with logical axes ('codebook', 'embed').

  Straight-through kind: `params/codebook`. EMA VQ kind: `codebook_ema/{codebook, cluster_size,
  embed_sum}`, updated when called with `update_ema=True` and the collection mutable:

    out, updates = quantizer.apply({'params': p, 'codebook_ema': ema}, h_BxD, update_ema=True,
                                   mutable=['codebook_ema'])

  The update uses this batch's assignments, made with the codebook from before the update.

  The codebook is initialised at random (xavier normal, as the reference); k-means centres are
  put in afterwards with `load_centers` on the variables tree. (Not a module attribute: an array
  attribute makes the module unhashable and would be baked into `init` as a K x D constant.)

  Attributes:
    config: `QuantizerConfig`.
  """

  config: QuantizerConfig

  @nn.compact
  def __call__(self, h_BxD: jax.Array, *, gumbel_rng: jax.Array | None = None,
               update_ema: bool = False, weights_B: jax.Array | None = None) -> QuantizeOutput:
    """Quantizes `h_BxD`.

    Args:
      h_BxD: representations.
      gumbel_rng: Gumbel noise for the straight-through kind (None: no noise).
      update_ema: EMA kind: update the codebook statistics from this batch (needs
        `mutable=['codebook_ema']`; ignored at init).
      weights_B: EMA kind: rows with weight 0 (batch padding) count neither in the EMA
        statistics nor in `vq_commitment_loss`.
    """
    cfg = self.config
    shape = (cfg.codebook_size, cfg.emb_dim)
    if cfg.kind == STRAIGHT_THROUGH:
      codebook_KxD = self.param(
          "codebook", nn.with_logical_partitioning(CODEBOOK_INIT, ("codebook", "embed")), shape,
          jnp.float32)
      return straight_through_quantize(
          h_BxD, codebook_KxD, temperature=cfg.temperature, gumbel_rng=gumbel_rng,
          gumbel_scale=cfg.gumbel_scale, normalize=cfg.normalize)
    if cfg.kind != EMA_VQ:
      raise ValueError(f"Unknown quantizer kind {cfg.kind!r}; use {STRAIGHT_THROUGH!r} or "
                       f"{EMA_VQ!r}.")

    codebook = self.variable(
        EMA_COLLECTION, "codebook",
        nn.with_logical_partitioning(CODEBOOK_INIT, ("codebook", "embed")),
        self.make_rng("params") if self.is_initializing() else None, shape, jnp.float32)
    # A unit prior count per code with `embed_sum = codebook`: the first updates blend the batch
    # means with the (k-means) codewords instead of replacing them outright, as zero-initialised
    # statistics would.
    cluster_size = self.variable(
        EMA_COLLECTION, "cluster_size",
        nn.with_logical_partitioning(lambda: jnp.ones(shape[:1], jnp.float32), ("codebook",)))
    embed_sum = self.variable(
        EMA_COLLECTION, "embed_sum",
        nn.with_logical_partitioning(lambda: jnp.asarray(codebook.value), ("codebook", "embed")))
    out = nearest_codeword_quantize(h_BxD, codebook.value,
                                    commitment_weight=cfg.commitment_weight, weights_B=weights_B)
    if update_ema and not self.is_initializing():
      if not self.is_mutable_collection(EMA_COLLECTION):
        raise ValueError(f"update_ema=True needs mutable=['{EMA_COLLECTION}'] in apply().")
      codebook.value, cluster_size.value, embed_sum.value = ema_codebook_update(
          h_BxD, out.codes_B, codebook.value, cluster_size.value, embed_sum.value,
          decay=cfg.ema_decay, epsilon=cfg.ema_epsilon, weights_B=weights_B)
    return out


def fit_codebook(h_NxD: Any, codes_N: Any, num_codes: int, *, normalize: bool = False,
                 steps: int = 500, learning_rate: float = 0.05) -> np.ndarray:
  """The codebook E whose straight-through logits h.E best predict `codes_N`, at h's mean norm.

  When the codes come from clustering something other than h itself (e.g. what the
  reconstructor decodes from h), the quantizer needs codewords that reproduce them: E is the
  softmax regression of the codes on h under the quantizer's own logits (no bias, like the
  quantizer; times a fitted common scale), by full-batch Adam from the codes' mean directions.
  The rows are then scaled by one common factor so their mean norm is h's mean norm, as k-means
  codewords are (`index_pipeline.codebook_from_centers`); a common factor keeps every argmax.

  Args:
    h_NxD: float representations.
    codes_N: int target codes in [0, num_codes).
    num_codes: K.
    normalize: cosine logits, as `straight_through_quantize(normalize=True)`.
    steps, learning_rate: the Adam fit.

  Returns:
    float32 [K, D] codebook.
  """
  h_NxD = jnp.asarray(h_NxD, jnp.float32)
  codes_N = jnp.asarray(codes_N, jnp.int32)
  onehot_NxK = jax.nn.one_hot(codes_N, num_codes, dtype=jnp.float32)
  # Start: each code's mean direction of h (a zero row for an unused code).
  start_KxD = _l2_normalize(onehot_NxK.T @ _l2_normalize(h_NxD))
  h_norm = jnp.mean(jnp.linalg.norm(h_NxD, axis=-1))
  # Fit in units of h's norm, so one learning rate suits any scale of h.
  x_NxD = h_NxD / h_norm

  def loss(fit):
    codebook_KxD, log_scale = fit
    logits_NxK = straight_through_quantize(x_NxD, codebook_KxD, normalize=normalize).logits_BxK
    # A free common scale (cosine logits are bounded by 1); it changes no argmax.
    return optax.softmax_cross_entropy(jnp.exp(log_scale) * logits_NxK, onehot_NxK).mean()

  optimizer = optax.adam(learning_rate)

  def step(carry, _):
    fit, opt_state = carry
    updates, opt_state = optimizer.update(jax.grad(loss)(fit), opt_state)
    return (optax.apply_updates(fit, updates), opt_state), None

  start = (start_KxD, jnp.zeros((), jnp.float32))
  ((codebook_KxD, _), _), _ = jax.jit(lambda fit: jax.lax.scan(
      step, (fit, optimizer.init(fit)), None, length=steps))(start)
  scale = h_norm / jnp.mean(jnp.linalg.norm(codebook_KxD, axis=-1))
  return np.asarray(codebook_KxD * scale, np.float32)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def _replace_leaf(tree: Mapping[str, Any], keys: Sequence[str], value: jax.Array):
  """A copy of nested dict `tree` with the leaf at `keys` replaced, keeping any axis box."""
  head, *rest = keys
  if head not in tree:
    raise KeyError(f"{head!r} not found among {sorted(tree)}.")
  out = dict(tree)
  if rest:
    out[head] = _replace_leaf(tree[head], rest, value)
  else:
    old = tree[head]
    if isinstance(old, nn.meta.AxisMetadata):
      out[head] = old.replace_boxed(value)
    else:
      out[head] = value
  return out


def _get_leaf(tree: Mapping[str, Any], keys: Sequence[str]) -> jax.Array:
  for key in keys:
    tree = tree[key]
  return nn.unbox(tree)


def load_centers(variables: Mapping[str, Any], centers_KxD: Any,
                 path: Sequence[str] = ()) -> dict[str, Any]:
  """Returns `variables` with the quantizer's codebook set to `centers_KxD` (e.g. k-means).

  Works for either kind: `params/<path>/codebook`, or for the EMA VQ `codebook_ema/<path>/`
  where the statistics are reset to match (`cluster_size` = 1, `embed_sum` = centres).

  Args:
    variables: a variables dict holding the quantizer (e.g. from `init`), boxed or not.
    centers_KxD: the new codebook; its shape must match.
    path: module names from the root of `variables` to the quantizer, e.g. ('quantizer',).
  """
  path = tuple(path)
  if EMA_COLLECTION in variables and _has(variables[EMA_COLLECTION], path + ("codebook",)):
    old = _get_leaf(variables[EMA_COLLECTION], path + ("codebook",))
    centers = _checked_centers(centers_KxD, old)
    ema = variables[EMA_COLLECTION]
    ema = _replace_leaf(ema, path + ("codebook",), centers)
    # Its own buffer: a train step donates its state, and one buffer cannot be donated twice.
    ema = _replace_leaf(ema, path + ("embed_sum",), jnp.array(centers, copy=True))
    ema = _replace_leaf(ema, path + ("cluster_size",), jnp.ones(centers.shape[:1], jnp.float32))
    return {**variables, EMA_COLLECTION: ema}
  old = _get_leaf(variables["params"], path + ("codebook",))
  centers = _checked_centers(centers_KxD, old)
  return {**variables, "params": _replace_leaf(variables["params"], path + ("codebook",), centers)}


def codebook_of(variables: Mapping[str, Any], path: Sequence[str] = ()) -> jax.Array:
  """The [K, D] codebook of a quantizer of either kind (unboxed), e.g. to copy into the LM."""
  path = tuple(path)
  if EMA_COLLECTION in variables and _has(variables[EMA_COLLECTION], path + ("codebook",)):
    return _get_leaf(variables[EMA_COLLECTION], path + ("codebook",))
  return _get_leaf(variables["params"], path + ("codebook",))


def _has(tree: Any, keys: Sequence[str]) -> bool:
  for key in keys:
    if not isinstance(tree, Mapping) or key not in tree:
      return False
    tree = tree[key]
  return True


def _checked_centers(centers_KxD: Any, old_KxD: jax.Array) -> jax.Array:
  centers = jnp.asarray(np.asarray(centers_KxD), jnp.float32)
  if centers.shape != old_KxD.shape:
    raise ValueError(f"centers have shape {centers.shape}, the codebook {old_KxD.shape}.")
  return centers


def codebook_usage(codes_N: jax.Array, num_codes: int,
                   weights_N: jax.Array | None = None) -> dict[str, jax.Array]:
  """Usage statistics of an assignment (jit-friendly; `num_codes` is static).

  Args:
    codes_N: int codes in [0, num_codes).
    num_codes: K.
    weights_N: optional row weights (0 = padding row).

  Returns:
    codes_used: number of codes with at least one (weighted) row.
    unused_ratio: 1 - codes_used / K (the reference's "zeros ratio").
    usage_perplexity: exp(entropy of the usage distribution), K for a uniform assignment, 1 when
      every row has the same code (the reference's code perplexity).
    max_ratio: share of rows on the most used code.
  """
  if weights_N is None:
    weights_N = jnp.ones(codes_N.shape, jnp.float32)
  counts_K = jnp.zeros((num_codes,), jnp.float32).at[codes_N].add(weights_N.astype(jnp.float32))
  p_K = counts_K / jnp.maximum(jnp.sum(counts_K), 1e-12)
  entropy = -jnp.sum(jnp.where(p_K > 0, p_K * jnp.log(jnp.where(p_K > 0, p_K, 1.0)), 0.0))
  codes_used = jnp.sum(counts_K > 0).astype(jnp.float32)
  return {
      "codes_used": codes_used,
      "unused_ratio": 1.0 - codes_used / num_codes,
      "usage_perplexity": jnp.exp(entropy),
      "max_ratio": jnp.max(p_K),
  }
