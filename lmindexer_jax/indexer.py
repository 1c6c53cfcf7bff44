"""The semantic indexer: a T5 that emits one code per ID position, trained self-supervised.

For position t (0-based here, t = 0 is the paper's position 1) the T5 encoder reads the
document and the decoder reads `[start, <id_0_c1>, ..., <id_(t-1)_ct>]`, the codes already
assigned as position-specific ID tokens; the last decoder hidden state h_t represents the
document at position t. The losses (weights in `IndexerConfig`):

- reconstruction: a shallow reconstructor rebuilds every document token from the ID slots
  (the previous codes' embeddings and h_t, quantized once the codebook exists) and a random
  subset of the other tokens (`reconstructor.py`);
- contrastive: two dropout views of a document are positives; at t = 0 the rest of the global
  batch are negatives, at t > 0 the batch's documents sharing the prefix (the input pipeline
  batches siblings together, `siblings.py`), so position t separates siblings;
- commitment: the decoder keeps predicting the earlier codes (`losses.commitment_loss`);
- code commitment (optional, not in the reference): the quantizer's logits keep choosing the
  k-means code (`losses.code_commitment_loss`).

This module holds the Flax module and its `models.BaseModel`; `index_pipeline.py` runs the
progressive schedule over the corpus.

Legend: B batch, L document length, D d_model, P previous codes (= t), V vocab,
K codebook size.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmindexer_jax import losses
from lmindexer_jax import models
from lmindexer_jax import quantizer
from lmindexer_jax import reconstructor
from lmindexer_jax import t5
from lmindexer_jax import vocabularies


@dataclasses.dataclass(frozen=True)
class IndexerConfig:
  """The method's hyperparameters (defaults: the reference's, its bugs fixed).

  Attributes:
    codebook_sizes: K_t of each learned position.
    mask_ratios: reconstruction mask ratio at position 1 and after (the reference: 0.5, 0.7).
    num_negatives: same-prefix negatives per document at t > 0: siblings are batched in runs of
      num_negatives + 1 (more when the batch holds more of the group).
    contrastive_temperature: divides contrastive scores (the reference: 1, raw dot product).
    contrastive_normalize: cosine instead of dot-product contrastive scores.
    contrastive_weight: one weight, or (position 1, later positions): in-batch negatives at
      position 1 teach instance identity, same-prefix negatives later separate siblings, and a
      corpus may want one and not the other.
    reconstruction_weight, commitment_weight: loss weights; 0 switches a term off (the "no
      reconstructor / no commitment" ablations; contrastive_weight 0: "no contrastive").
    code_commitment_weight: weight of `losses.code_commitment_loss` (straight-through
      quantizer, training steps of every stage that quantizes): holds each document at its
      k-means code while the encoder trains (in the joint ablation, at its current code). 0,
      the reference, lets codes drift from the k-means start.
    quantizer_temperature: softmax temperature of the straight-through quantizer.
    gumbel_scale: Gumbel noise on the quantizer logits while training (0: none, the reference).
    quantizer_normalize: cosine instead of dot-product code logits. The LM's greedy choice
      among a position's tokens (dot products with the copied codewords) can then differ from
      the code where codeword norms differ; the IDs are the quantizer's.
    quantizer_kind: 'straight_through' (the method) or 'ema_vq': VQ-VAE's nearest codeword (L2)
      with an EMA codebook and its own commitment term (`vq_commitment_weight`, EMA decay
      `ema_decay`). Its codewords keep their k-means norms, so the LM's greedy choice among a
      position's tokens (dot products) need not be the code; the IDs are the quantizer's.
    reconstructor_config: the reconstructor's own settings.
  """

  codebook_sizes: tuple[int, ...] = (8, 8)
  mask_ratios: tuple[float, float] = (0.5, 0.7)
  num_negatives: int = 4
  contrastive_temperature: float = 1.0
  contrastive_normalize: bool = False
  reconstruction_weight: float = 1.0
  contrastive_weight: float | tuple[float, float] = 1.0
  commitment_weight: float = 1.0
  code_commitment_weight: float = 0.0
  quantizer_temperature: float = 1.0
  gumbel_scale: float = 0.0
  quantizer_normalize: bool = False
  quantizer_kind: str = quantizer.STRAIGHT_THROUGH
  ema_decay: float = 0.99
  vq_commitment_weight: float = 0.25
  reconstructor_config: reconstructor.ReconstructorConfig = reconstructor.ReconstructorConfig()

  def __post_init__(self):
    if self.code_commitment_weight and self.quantizer_kind != quantizer.STRAIGHT_THROUGH:
      raise ValueError("code_commitment_weight is the straight-through quantizer's; the "
                       f"{self.quantizer_kind!r} quantizer has vq_commitment_weight")

  def mask_ratio(self, position: int) -> float:
    return self.mask_ratios[0] if position == 0 else self.mask_ratios[1]

  def contrastive_weight_at(self, position: int) -> float:
    weights = self.contrastive_weight
    if isinstance(weights, int | float):
      return float(weights)
    return float(weights[0] if position == 0 else weights[1])


class SemanticIndexer(nn.Module):
  """T5 + reconstructor + one codebook per learned position."""

  t5_config: t5.T5Config
  layout: vocabularies.IdLayout
  config: IndexerConfig

  def setup(self):
    cfg = self.config
    if self.t5_config.vocab_size < self.layout.vocab_size:
      raise ValueError(
          f"T5 vocab_size ({self.t5_config.vocab_size}) is smaller than the ID layout's "
          f"({self.layout.vocab_size})."
      )
    self.t5 = t5.Transformer(self.t5_config)
    self.reconstructor = reconstructor.Reconstructor(cfg.reconstructor_config, self.t5_config)
    self.quantizers = [
        quantizer.Quantizer(quantizer.QuantizerConfig(
            codebook_size=k, emb_dim=self.t5_config.emb_dim,
            kind=cfg.quantizer_kind, temperature=cfg.quantizer_temperature,
            gumbel_scale=cfg.gumbel_scale, normalize=cfg.quantizer_normalize,
            ema_decay=cfg.ema_decay, commitment_weight=cfg.vq_commitment_weight))
        for k in cfg.codebook_sizes
    ]

  def __call__(self, tokens_BxL: jax.Array, prefix_codes_BxP: jax.Array) -> jax.Array:
    """Touches every parameter (for `init`); returns reconstruction logits."""
    h_BxD, _ = self.represent(tokens_BxL, prefix_codes_BxP, enable_dropout=False)
    for position in range(len(self.quantizers)):
      self.quantize(position, h_BxD)
    return self.t5.logits_from_hidden(
        self.reconstruct(h_BxD, prefix_codes_BxP, tokens_BxL, None, enable_dropout=False))

  def id_tokens(self, codes_BxP: jax.Array) -> jax.Array:
    """The ID tokens of codes c_1..c_P (position p's code -> `<id_p_code>`)."""
    starts_P = jnp.asarray(self.layout.position_starts[: codes_BxP.shape[1]], jnp.int32)
    return codes_BxP.astype(jnp.int32) + starts_P[None, :]

  def represent(
      self, tokens_BxL: jax.Array, prefix_codes_BxP: jax.Array, *, enable_dropout: bool
  ) -> tuple[jax.Array, jax.Array]:
    """h_t of each document and the decoder's logits at the P prefix positions.

    Returns:
      (h_BxD, logits_BxPxV): logits at decoder position p predict code p (commitment loss).
    """
    encoded_BxLxD = self.t5.encode(tokens_BxL, enable_dropout=enable_dropout)
    start_Bx1 = jnp.zeros((tokens_BxL.shape[0], 1), jnp.int32)
    decoder_BxT = jnp.concatenate([start_Bx1, self.id_tokens(prefix_codes_BxP)], axis=1)
    logits_BxTxV, hidden_BxTxD = self.t5.decode(
        encoded_BxLxD, tokens_BxL, decoder_BxT, enable_dropout=enable_dropout,
        return_hidden=True)
    return hidden_BxTxD[:, -1].astype(jnp.float32), logits_BxTxV[:, :-1]

  def quantize(self, position: int, h_BxD: jax.Array, gumbel_rng: jax.Array | None = None,
               update_ema: bool = False):
    return self.quantizers[position](h_BxD, gumbel_rng=gumbel_rng, update_ema=update_ema)

  def reconstruct(
      self, h_BxD: jax.Array, prefix_codes_BxP: jax.Array, tokens_BxL: jax.Array,
      mask_BxLxS: jax.Array | None, *, enable_dropout: bool,
      continuous_h_BxD: jax.Array | None = None,
  ) -> jax.Array:
    """The reconstructor's row for every document token, rebuilt from [prefix code embeddings;
    h] (B x L x D; `lm_head` scores it)."""
    prefix_BxPxD = self.t5.embed(self.id_tokens(prefix_codes_BxP))
    id_embs_BxCxD = jnp.concatenate([prefix_BxPxD, h_BxD[:, None].astype(prefix_BxPxD.dtype)], 1)
    return self.reconstruct_from_slots(id_embs_BxCxD, tokens_BxL, mask_BxLxS,
                                       enable_dropout=enable_dropout,
                                       continuous_h_BxD=continuous_h_BxD)

  def reconstruct_from_slots(
      self, id_embs_BxCxD: jax.Array, tokens_BxL: jax.Array, mask_BxLxS: jax.Array | None, *,
      enable_dropout: bool, continuous_h_BxD: jax.Array | None = None,
  ) -> jax.Array:
    """The reconstructor's row for every document token, rebuilt from the given ID slot
    vectors (B x L x D)."""
    return self.reconstructor(
        id_embs_BxCxD, tokens_BxL, self.t5.embed(tokens_BxL), mask_BxLxS,
        enable_dropout=enable_dropout, continuous_h_BxD=continuous_h_BxD)

  def id_token_distribution(self, tokens_BxL: jax.Array, prefix_codes_BxP: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    """What the ID says about the document: the reconstructor's token distribution (B x V, no
    dropout) for a row that sees the ID slots (prefix codes and the continuous h_t) and none
    of the document's tokens; and h_t (B x D) itself.

    `index_pipeline` can cluster these instead of h_t: they place documents by the words their
    ID predicts, a geometry the reconstructor defines, where h_t's own is arbitrary.
    """
    h_BxD, _ = self.represent(tokens_BxL, prefix_codes_BxP, enable_dropout=False)
    # A one-token document: its row never sees itself, so it reads the ID slots only.
    rows_Bx1xD = self.reconstruct(h_BxD, prefix_codes_BxP, tokens_BxL[:, :1], None,
                                  enable_dropout=False)
    return jax.nn.softmax(rows_Bx1xD[:, 0].astype(jnp.float32) @ self.lm_head(), axis=-1), h_BxD

  def lm_head(self) -> jax.Array:
    """The T5's LM head [D, V], which scores the reconstructor's rows."""
    return self.t5.lm_head()

  def tied_codebook(self, position: int) -> jax.Array:
    """E_t read from the embeddings of position t's ID tokens (K x D), for joint training.

    Training all positions at once, the decoder reads the codes it assigns itself, so its input
    embedding of code c must be the codeword E_t[c] at every step, not only after a copy.
    """
    start, end = self.layout.position_range(position)
    return self.t5.token_embedder.embedding[start:end].astype(jnp.float32)

  def represent_all(self, tokens_BxL: jax.Array, *, enable_dropout: bool
                    ) -> tuple[jax.Array, jax.Array]:
    """h_1..h_C with the decoder fed its own greedy codes (the "all positions at once" mode).

    c_t = argmax h_t . E_t with the tied codebooks (`tied_codebook`); the codes are chosen
    without gradient, by decoder passes without dropout over the one encoding (with dropout
    while training), then one decoder pass over [start, c_1..c_(C-1)] gives every h_t (the
    decoder is causal, so h_t sees only c_1..c_(t-1)).

    Returns:
      (h_BxCxD float32, codes_BxC int32 greedy codes).
    """
    num_positions = len(self.config.codebook_sizes)
    encoded_BxLxD = self.t5.encode(tokens_BxL, enable_dropout=enable_dropout)
    codes_BxP = jnp.zeros((tokens_BxL.shape[0], 0), jnp.int32)
    start_Bx1 = jnp.zeros((tokens_BxL.shape[0], 1), jnp.int32)
    hidden_BxTxD = None
    for t in range(num_positions):
      decoder_BxT = jnp.concatenate([start_Bx1, self.id_tokens(codes_BxP)], axis=1)
      encoded = encoded_BxLxD if t == num_positions - 1 else jax.lax.stop_gradient(encoded_BxLxD)
      _, hidden_BxTxD = self.t5.decode(
          encoded, tokens_BxL, decoder_BxT, enable_dropout=enable_dropout and
          t == num_positions - 1, return_hidden=True)
      code_B = quantizer.straight_through_quantize(
          jax.lax.stop_gradient(hidden_BxTxD[:, -1]), jax.lax.stop_gradient(self.tied_codebook(t)),
          normalize=self.config.quantizer_normalize).codes_B
      codes_BxP = jnp.concatenate([codes_BxP, code_B[:, None]], axis=1)
    return hidden_BxTxD.astype(jnp.float32), codes_BxP


def variables(params: dict) -> dict:
  """The Flax variables of `SemanticIndexer` parameters.

  An EMA quantizer's statistics live in the `codebook_ema` collection, but the trainer and the
  pipeline keep them in `params` under their quantizer (`quantizers_<t>/{codebook,
  cluster_size, embed_sum}`): one tree to checkpoint, and `quantizers_<t>/codebook` is E_t for
  either kind. They get no gradient; the loss returns their EMA update under
  `models.STATE_UPDATES`.
  """
  ema = {name: value for name, value in params.items()
         if name.startswith("quantizers_") and "cluster_size" in value}
  if not ema:
    return {"params": params}
  rest = {name: value for name, value in params.items() if name not in ema}
  return {"params": rest, quantizer.EMA_COLLECTION: ema}


def params_of(variables: dict) -> dict:
  """The inverse of `variables`: EMA codebook statistics folded into `params`."""
  return {**variables["params"], **variables.get(quantizer.EMA_COLLECTION, {})}


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one training stage of one position does.

  Attributes:
    position: t, 0-based.
    use_codebook: quantize h_t (else the reconstructor reads the continuous h_t).
    freeze_t5: train the reconstructor only (the warm-up before position 1).
    joint: train every position at once (`Schedule.progressive=False`): the decoder reads its
      own greedy codes, the reconstructor the quantized h_1..h_C (`IndexerModel.joint_loss`).
  """

  position: int
  use_codebook: bool
  freeze_t5: bool = False
  joint: bool = False


class IndexerModel(models.BaseModel):
  """The indexer's loss at one stage, for `train.train`.

  Batches hold `encoder_input_tokens` [B, L] and, at t > 0, `prefix_codes` [B, t] (rows with
  the same prefix are each other's contrastive negatives); with code commitment, the quantized
  stages' batches hold `code_targets` [B], the codes k-means gave (the kmeans_t stage).
  """

  def __init__(self, module: SemanticIndexer, stage: Stage, eval_mask_seed: int | None = None):
    """`eval_mask_seed`: without an rng (evaluation), sample the reconstruction mask at the
    training ratio from this seed instead of showing every other token: a reconstructor
    trained to read a tenth of the document is not measured on all of it."""
    self.module = module
    self.stage = stage
    self.eval_mask_seed = eval_mask_seed

  def init_params(self, rng, batch):
    tokens = jnp.ones(batch["encoder_input_tokens"].shape, jnp.int32)
    prefix = jnp.zeros((tokens.shape[0], self.stage.position), jnp.int32)
    return params_of(self.module.init({"params": rng}, tokens, prefix))

  def _applier(self, params, rng, names):
    """(apply, rngs): `apply(method, ..., rng_name=)` runs the module with that rng stream as
    its dropout rng (none without `rng`, i.e. in evaluation); `rngs` has one stream per name."""
    rngs = {}
    if rng is not None:
      rngs = dict(zip(names, jax.random.split(rng, len(names)), strict=True))

    def apply(method, *args, rng_name=None, **kwargs):
      dropout = {"dropout": rngs[rng_name]} if rng_name and rng is not None else None
      return self.module.apply(variables(params), *args, rngs=dropout, method=method, **kwargs)

    return apply, rngs

  def _reconstruction_term(self, apply, rngs, tokens_BxL, num_slots, ratio, hidden_fn):
    """Token cross-entropy of the rows `hidden_fn(mask_BxLxS)` under the LM head, with the
    reconstruction mask sampled from the 'mask' stream in training, from `eval_mask_seed` (or
    none) in evaluation."""
    special_ids = self.module.config.reconstructor_config.special_ids
    mask_rng = rngs.get("mask")
    if mask_rng is None and self.eval_mask_seed is not None:
      mask_rng = jax.random.PRNGKey(self.eval_mask_seed)
    mask_BxLxS = reconstructor.sample_reconstruction_mask(
        mask_rng, tokens_BxL, num_slots, ratio, special_ids)
    weights_BxL = reconstructor.target_mask(tokens_BxL, special_ids)
    return losses.reconstruction_loss(hidden_fn(mask_BxLxS), apply(SemanticIndexer.lm_head),
                                      tokens_BxL, weights_BxL)

  def loss_fn(self, params, batch, rng):
    if self.stage.joint:
      return self.joint_loss(params, batch, rng)
    cfg, stage = self.module.config, self.stage
    t = stage.position
    if stage.freeze_t5:
      # Zero gradients: AdamW (without weight decay) then leaves T5 exactly as it was.
      params = {**params, "t5": jax.lax.stop_gradient(params["t5"])}
    tokens_BxL = batch["encoder_input_tokens"]
    batch_size = tokens_BxL.shape[0]
    prefix_BxP = batch.get("prefix_codes", jnp.zeros((batch_size, 0), jnp.int32))
    deterministic = rng is None
    apply, rngs = self._applier(params, rng, ("view1", "view2", "mask", "gumbel"))
    h_BxD, commit_logits_BxPxV = apply(
        SemanticIndexer.represent, tokens_BxL, prefix_BxP, enable_dropout=not deterministic,
        rng_name="view1")
    metrics = {}
    total = jnp.zeros((), jnp.float32)

    # The quantizer, once the codebook exists (also without reconstruction: code commitment
    # and the EMA codebook need it).
    q = None
    if stage.use_codebook:
      if cfg.quantizer_kind == quantizer.EMA_VQ:
        update = not deterministic and not stage.freeze_t5
        q, new_vars = apply(SemanticIndexer.quantize, t, h_BxD, update_ema=update,
                            mutable=[quantizer.EMA_COLLECTION])
        total += q.vq_commitment_loss
        metrics["vq_commitment_loss"] = q.vq_commitment_loss
        if update:
          metrics[models.STATE_UPDATES] = new_vars[quantizer.EMA_COLLECTION]
      else:
        gumbel = rngs.get("gumbel") if cfg.gumbel_scale else None
        q = apply(SemanticIndexer.quantize, t, h_BxD, gumbel)
      metrics["codes_used_in_batch"] = jnp.sum(
          jnp.bincount(q.codes_B, length=cfg.codebook_sizes[t]) > 0).astype(jnp.float32)

    # Reconstruction from the ID (the quantized h_t once the codebook exists).
    if cfg.reconstruction_weight:
      id_h_BxD = h_BxD if q is None else q.quantized_BxD
      loss, m = self._reconstruction_term(
          apply, rngs, tokens_BxL, t + 1, cfg.mask_ratio(t),
          lambda mask_BxLxS: apply(
              SemanticIndexer.reconstruct, id_h_BxD, prefix_BxP, tokens_BxL, mask_BxLxS,
              enable_dropout=not deterministic, continuous_h_BxD=h_BxD, rng_name="view1"))
      total += cfg.reconstruction_weight * loss
      metrics.update(m)

    # Code commitment: the quantizer keeps choosing the k-means codes (straight-through only,
    # `IndexerConfig` checks).
    if cfg.code_commitment_weight and q is not None and not deterministic:
      if "code_targets" not in batch:
        raise ValueError("code_commitment_weight needs batch['code_targets'] (the k-means "
                         "codes of the position)")
      loss, m = losses.code_commitment_loss(q.logits_BxK, batch["code_targets"])
      total += cfg.code_commitment_weight * loss
      metrics.update(m)

    # Contrastive: a second dropout view is the positive (not in the frozen warm-up).
    contrastive_weight = cfg.contrastive_weight_at(t)
    if contrastive_weight and not stage.freeze_t5 and not deterministic:
      if self.module.t5_config.dropout_rate:
        h2_BxD, _ = apply(SemanticIndexer.represent, tokens_BxL, prefix_BxP,
                          enable_dropout=True, rng_name="view2")
      else:
        h2_BxD = h_BxD  # Without dropout the second view is the same vector: skip its pass.
      if t == 0:
        loss, m = losses.in_batch_contrastive_loss(
            h_BxD, h2_BxD, temperature=cfg.contrastive_temperature,
            normalize=cfg.contrastive_normalize)
      else:
        # Same-prefix siblings are the batch's other rows with the same prefix
        # (`index_pipeline.DocumentBatches` batches them together).
        loss, m = losses.in_batch_contrastive_loss(
            h_BxD, h2_BxD, temperature=cfg.contrastive_temperature,
            normalize=cfg.contrastive_normalize, groups_BxP=prefix_BxP)
        m = {f"prefix_{key}": value for key, value in m.items()}
      total += contrastive_weight * loss
      metrics.update(m)

    # Commitment: the decoder must keep predicting the codes already assigned.
    if cfg.commitment_weight and t > 0:
      loss, m = losses.commitment_loss(commit_logits_BxPxV, prefix_BxP, self.module.layout)
      total += cfg.commitment_weight * loss
      metrics.update(m)

    metrics["loss"] = total
    return total, metrics

  def joint_loss(self, params, batch, rng):
    """All positions at once: reconstruction from the quantized h_1..h_C, contrastive per position.

    The ablation of the progressive schedule. Each h_t is quantized with the tied codebook
    (`SemanticIndexer.tied_codebook`); the reconstructor reads all C quantized vectors (mask
    ratio of the later positions). Contrastive: at position 1 against the batch, at t > 1
    against the batch's documents with the same current prefix (the batches are not grouped:
    the prefixes change as the codes do). No commitment loss: there are no earlier codes to keep.
    """
    cfg = self.module.config
    tokens_BxL = batch["encoder_input_tokens"]
    if cfg.quantizer_kind != quantizer.STRAIGHT_THROUGH:
      raise ValueError("training all positions at once ties each codebook to its ID tokens' "
                       f"embeddings: it needs quantizer_kind={quantizer.STRAIGHT_THROUGH!r}")
    deterministic = rng is None
    apply, rngs = self._applier(params, rng, ("view1", "view2", "mask", "gumbel"))
    h_BxCxD, codes_BxC = apply(SemanticIndexer.represent_all, tokens_BxL,
                               enable_dropout=not deterministic, rng_name="view1")
    num_positions = h_BxCxD.shape[1]
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    if cfg.reconstruction_weight or cfg.code_commitment_weight:
      gumbel_rngs = [None] * num_positions
      if cfg.gumbel_scale and "gumbel" in rngs:
        gumbel_rngs = list(jax.random.split(rngs["gumbel"], num_positions))
      slots = []
      for t in range(num_positions):
        codebook_KxD = apply(SemanticIndexer.tied_codebook, t)
        q = quantizer.straight_through_quantize(
            h_BxCxD[:, t], codebook_KxD, temperature=cfg.quantizer_temperature,
            gumbel_rng=gumbel_rngs[t], gumbel_scale=cfg.gumbel_scale,
            normalize=cfg.quantizer_normalize)
        slots.append(q.quantized_BxD)
        if cfg.code_commitment_weight and not deterministic:
          loss, m = losses.code_commitment_loss(q.logits_BxK, q.codes_B)
          total += cfg.code_commitment_weight * loss
          metrics.update({f"{key}_{t + 1}": value for key, value in m.items()})
        metrics[f"codes_used_in_batch_{t + 1}"] = jnp.sum(
            jnp.bincount(q.codes_B, length=cfg.codebook_sizes[t]) > 0).astype(jnp.float32)
    if cfg.reconstruction_weight:
      loss, m = self._reconstruction_term(
          apply, rngs, tokens_BxL, num_positions, cfg.mask_ratio(num_positions - 1),
          lambda mask_BxLxS: apply(
              SemanticIndexer.reconstruct_from_slots, jnp.stack(slots, axis=1), tokens_BxL,
              mask_BxLxS, enable_dropout=not deterministic, continuous_h_BxD=h_BxCxD[:, -1],
              rng_name="view1"))
      total += cfg.reconstruction_weight * loss
      metrics.update(m)

    if not deterministic and (cfg.contrastive_weight_at(0) or cfg.contrastive_weight_at(1)):
      h2_BxCxD = h_BxCxD
      if self.module.t5_config.dropout_rate:
        h2_BxCxD, _ = apply(SemanticIndexer.represent_all, tokens_BxL, enable_dropout=True,
                            rng_name="view2")
      for t in range(num_positions):
        weight = cfg.contrastive_weight_at(t)
        if not weight:
          continue
        loss, m = losses.in_batch_contrastive_loss(
            h_BxCxD[:, t], h2_BxCxD[:, t], temperature=cfg.contrastive_temperature,
            normalize=cfg.contrastive_normalize, groups_BxP=codes_BxC[:, :t] if t else None)
        total += weight * loss
        metrics.update({f"{key}_{t + 1}": value for key, value in m.items()})

    metrics["loss"] = total
    return total, metrics
