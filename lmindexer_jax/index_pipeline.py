"""The whole progressive indexing schedule, one resumable command.

  warmup -> for each position t: nocode_t -> kmeans_t -> quantized_t -> assign_t -> ... -> ids

- warmup: the reconstructor learns to read h with T5 frozen (before position 1).
- nocode_t: train with the reconstructor reading the continuous h_t.
- kmeans_t: encode the corpus, k-means on h_t (`kmeans.py`); the centres initialise E_t.
  (`Schedule.kmeans_features='decoded'`: k-means on what the reconstructor decodes from h_t,
  and E_t is fitted to reproduce those clusters, `initial_codebook`; with
  `Schedule.kmeans_per_prefix`, within each prefix group.) The clusters are saved as the codes
  the quantized stage holds documents at (code commitment).
- quantized_t: train with the straight-through quantizer.
- assign_t: c_t = argmax h_t E_t^T for every document; E_t is copied into the embeddings of
  position t's ID tokens, so the trained T5 itself assigns IDs by greedy decoding.
- ids: documents sharing a full ID get a disambiguation code; `semantic_ids.tsv` and
  `index_stats.json` are written atomically.

Each stage lives in `MODEL_DIR/stages/<name>/`; a training stage resumes from its last
checkpoint and a finished stage (its `done.json`) is skipped, so a rerun after a kill goes on
where it stopped.

Legend: N documents, L length, D d_model, B batch, P previous codes, K codes.
"""

import dataclasses
import functools
import json
import os
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
from scipy import optimize
import seqio

from lmindexer_jax import checkpoint_import
from lmindexer_jax import checkpoints
from lmindexer_jax import data
from lmindexer_jax import files
from lmindexer_jax import finetune
from lmindexer_jax import indexer
from lmindexer_jax import indexer_manifest
from lmindexer_jax import kmeans
from lmindexer_jax import metrics
from lmindexer_jax import optimizers
from lmindexer_jax import partitioning
from lmindexer_jax import quantizer
from lmindexer_jax import siblings
from lmindexer_jax import t5
from lmindexer_jax import train
from lmindexer_jax import vocabularies
from tasks import semantic_ids

KMEANS_FEATURES = ("hidden", "decoded")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Steps and batch sizes of the stages (gin-bound).

  Attributes:
    batch_size: global training batch (documents).
    warmup_steps, nocode_steps, quantized_steps: steps of each training stage; the last two per
      position, one number or a pair (position 1, later positions).
    learning_rate: peak AdamW learning rate of every stage (linear warmup over 10%, then decay).
    quantized_learning_rate: the quantized stages' own peak rate (None: `learning_rate`). They
      start from the k-means codes, and a rate that suits training from scratch moves h_t
      enough to reshuffle them (synthetic corpus, position 1: k-means codes AMI 0.64 against
      the top level; after 300 quantized steps 0.54 at 1e-2, 0.61 at 1e-3).
    kmeans_restarts, kmeans_iters: k-means runs and Lloyd iterations.
    kmeans_features: what k-means clusters to start E_t: 'hidden', h_t itself (cosine; the
      method), or 'decoded', the Hellinger embedding (square root) of the token distribution
      the reconstructor decodes from the ID alone (`SemanticIndexer.id_token_distribution`),
      Euclidean, less their prefix group's mean after position 1 (so a position splits its
      groups rather than repeating them); E_t is then fitted so that argmax h_t.E_t gives those
      clusters (`quantizer.fit_codebook`). On the synthetic corpus after 500 no-codebook
      steps, the position-1 codes k-means starts from reach AMI 0.82 against the top level
      with 'decoded', 0.65 with 'hidden' (gin/data/synthetic.gin has the runs).
    kmeans_per_prefix: at t > 1 with 'decoded' features, k-means within each prefix group
      (K_t clusters per group, numbered by `kmeans_within_groups`) instead of one k-means over
      all groups' residuals. A codebook shared by the groups cannot reproduce such clusters
      from h_t as it is, so they are the targets the quantized stage teaches (code commitment,
      `indexer.IndexerConfig.code_commitment_weight`, which this needs).
    kmeans_feature_dim: 'decoded' features are projected to this many dimensions (a fixed
      Gaussian random projection, which keeps Euclidean distances) when the vocabulary is
      larger, so k-means holds [N, kmeans_feature_dim], not [N, V].
    eval_batch_size: batch for encoding the corpus.
    checkpoint_period, log_period: as in `train.train`.
    progressive: train the positions one after another (the method). False is the "all
      positions at once" ablation: the codebooks start from k-means on the warm-up
      representations position by position (no per-position training), then one `joint` stage
      trains every position together (`indexer.IndexerModel.joint_loss`) and the IDs are the
      final model's greedy codes.
    joint_steps: steps of the joint stage (None: the progressive budget, positions x (nocode +
      quantized) steps).
  """

  batch_size: int = 64
  warmup_steps: int = 200
  nocode_steps: int | tuple[int, int] = 300
  quantized_steps: int | tuple[int, int] = 300
  learning_rate: float = 1e-3
  quantized_learning_rate: float | None = None
  kmeans_restarts: int = 3
  kmeans_iters: int = 100
  kmeans_features: str = "hidden"
  kmeans_per_prefix: bool = False
  kmeans_feature_dim: int = 1024
  eval_batch_size: int = 256
  checkpoint_period: int = 200
  log_period: int = 50
  progressive: bool = True
  joint_steps: int | None = None

  def __post_init__(self):
    if self.kmeans_features not in KMEANS_FEATURES:
      raise ValueError(f"Schedule.kmeans_features must be one of {KMEANS_FEATURES}, got "
                       f"{self.kmeans_features!r}")
    if self.kmeans_per_prefix and self.kmeans_features != "decoded":
      raise ValueError("Schedule.kmeans_per_prefix clusters decoded features: it needs "
                       "kmeans_features='decoded'")

  def steps(self, stage: str, position: int) -> int:
    """Steps of stage 'nocode' or 'quantized' at `position` (0-based)."""
    steps = {"nocode": self.nocode_steps, "quantized": self.quantized_steps}[stage]
    if isinstance(steps, int):
      return steps
    return int(steps[0] if position == 0 else steps[1])


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The tokenized corpus of an `index` task, in corpus order."""

  doc_ids: tuple[str, ...]
  tokens_NxL: np.ndarray
  labels_NxLv: np.ndarray  # int label per level, -1 unknown
  base_vocab_size: int


def load_corpus(task_name: str, max_length: int, *, module: str | None = "tasks") -> Corpus:
  """Reads every document of a `lmindexer.<dataset>.index` task (tokens truncated, EOS kept).

  Training and assignment both use these tokens, so they see the same length (the reference
  trains at 128 tokens and assigns at 512).
  """
  if module:
    __import__(module)
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset({"inputs": max_length, "targets": 1}, split="train", shuffle=False,
                        num_epochs=1)
  ds = ds.map(lambda ex: {k: ex[k] for k in ("inputs", "doc_id", "doc_index", "labels")})
  ds = ds.padded_batch(1024, padded_shapes={"inputs": [max_length], "doc_id": [],
                                            "doc_index": [], "labels": [None]},
                       padding_values={"inputs": 0, "doc_id": "", "doc_index": 0, "labels": -1})
  parts: dict[str, list] = {"inputs": [], "doc_id": [], "doc_index": [], "labels": []}
  for batch in ds.as_numpy_iterator():
    for k in parts:
      parts[k].append(batch[k])
  order = np.argsort(np.concatenate(parts["doc_index"]))
  levels = max(p.shape[1] for p in parts["labels"])
  labels = np.concatenate([np.pad(p, ((0, 0), (0, levels - p.shape[1])), constant_values=-1)
                           for p in parts["labels"]])
  return Corpus(
      doc_ids=tuple(d.decode() for d in np.concatenate(parts["doc_id"])[order]),
      tokens_NxL=np.concatenate(parts["inputs"])[order].astype(np.int32),
      labels_NxLv=labels[order].astype(np.int32),
      base_vocab_size=task.output_features["inputs"].vocabulary.vocab_size,
  )


class DocumentBatches(data.BatchIterator):
  """Shuffled batches of the corpus (each process its own share); at t > 0 siblings batched
  together.

  Epoch e visits this process's documents in an order seeded by (seed, e); batches never
  straddle epochs. The position (epoch, batch) is the whole state, so it is saved as JSON. At
  t > 0 each batch also carries the documents' prefix codes, and the order puts documents that
  share a prefix in runs of `num_negatives + 1` (`siblings.grouped_order`), so that each has
  `num_negatives` same-prefix negatives among the batch's other rows. Given `code_targets_N`
  (quantized stages with code commitment: the k-means codes), batches carry their
  `code_targets`.
  """

  def __init__(self, tokens_NxL: np.ndarray, batch_size: int, seed: int,
               prefix_codes_NxP: np.ndarray | None = None, num_negatives: int = 0,
               code_targets_N: np.ndarray | None = None):
    self._tokens = tokens_NxL
    self._docs = np.arange(len(tokens_NxL))[jax.process_index()::jax.process_count()]
    self._batch = batch_size // jax.process_count()
    if self._batch > len(self._docs):
      raise ValueError(f"batch_size ({batch_size}) exceeds the {len(tokens_NxL)} documents.")
    self._seed = seed
    self._prefix = None
    if prefix_codes_NxP is not None and prefix_codes_NxP.shape[1] > 0:
      self._prefix = np.asarray(prefix_codes_NxP, np.int32)
      self._groups = metrics.prefix_clusters(self._prefix[self._docs], self._prefix.shape[1])
    self._chunk = num_negatives + 1
    self._targets = code_targets_N
    self._epoch, self._position = 0, 0
    self._cached_order = (-1, None)

  def _order(self) -> np.ndarray:
    """This epoch's document order, computed once per epoch."""
    if self._cached_order[0] != self._epoch:
      rng = np.random.default_rng([self._seed, self._epoch])
      if self._prefix is None:
        order = rng.permutation(self._docs)
      else:
        order = self._docs[siblings.grouped_order(rng, self._groups, self._chunk)]
      self._cached_order = (self._epoch, order)
    return self._cached_order[1]

  @property
  def element_spec(self):
    b, length = self._batch, self._tokens.shape[1]
    spec = {"encoder_input_tokens": jax.ShapeDtypeStruct((b, length), np.int32)}
    if self._targets is not None:
      spec["code_targets"] = jax.ShapeDtypeStruct((b,), np.int32)
    if self._prefix is not None:
      spec["prefix_codes"] = jax.ShapeDtypeStruct((b, self._prefix.shape[1]), np.int32)
    return spec

  def __next__(self) -> dict[str, np.ndarray]:
    if (self._position + 1) * self._batch > len(self._docs):
      self._epoch, self._position = self._epoch + 1, 0
    idx_B = self._order()[self._position * self._batch:(self._position + 1) * self._batch]
    batch = {"encoder_input_tokens": self._tokens[idx_B]}
    if self._targets is not None:
      batch["code_targets"] = self._targets[idx_B].astype(np.int32)
    if self._prefix is not None:
      batch["prefix_codes"] = self._prefix[idx_B]
    self._position += 1
    return batch

  def _path(self, directory: str) -> str:
    return os.path.join(directory, f"process_{jax.process_index()}.json")

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(self._path(directory), "w") as f:
      json.dump({"epoch": self._epoch, "position": self._position}, f)

  def restore(self, directory: str) -> None:
    with open(self._path(directory)) as f:
      state = json.load(f)
    self._epoch, self._position = state["epoch"], state["position"]


def _map_corpus(fn, params: Any, tokens_NxL: np.ndarray, prefix_codes_NxP: np.ndarray,
                partitioner: partitioning.Partitioner, batch_size: int, *extra: Any) -> np.ndarray:
  """`fn(params, tokens_BxL, prefix_BxP, *extra)` over the corpus in batches (no dropout), rows
  split over the mesh's data axis; float32 [N, ...]."""
  n = len(tokens_NxL)
  batch_size = -(-batch_size // partitioner.data_parallel_size) * partitioner.data_parallel_size
  n_pad = -(-n // batch_size) * batch_size
  tokens = np.pad(tokens_NxL, ((0, n_pad - n), (0, 0)))
  prefix = np.pad(prefix_codes_NxP, ((0, n_pad - n), (0, 0)))
  with partitioner.activate():
    mapped = jax.jit(
        fn,
        in_shardings=(partitioner.replicated, partitioner.batch_sharding(),
                      partitioner.batch_sharding(), *[partitioner.replicated] * len(extra)),
        out_shardings=partitioner.sharding(P("batch", None)))
    params, extra = jax.device_put((params, extra), partitioner.replicated)
    out = [
        np.asarray(mapped(params, tokens[i:i + batch_size], prefix[i:i + batch_size], *extra))
        for i in range(0, n_pad, batch_size)
    ]
  return np.concatenate(out)[:n]


def encode_corpus(
    module: indexer.SemanticIndexer, params: Any, tokens_NxL: np.ndarray,
    prefix_codes_NxP: np.ndarray, partitioner: partitioning.Partitioner, batch_size: int,
) -> np.ndarray:
  """h_t of every document (no dropout), float32 [N, D]."""
  return _map_corpus(
      lambda p, x, c: module.apply(indexer.variables(p), x, c, enable_dropout=False,
                                   method=indexer.SemanticIndexer.represent)[0],
      params, tokens_NxL, prefix_codes_NxP, partitioner, batch_size)


def greedy_agreement(
    module: indexer.SemanticIndexer, params: Any, tokens_NxL: np.ndarray, codes_NxC: np.ndarray,
    partitioner: partitioning.Partitioner, batch_size: int,
) -> list[float]:
  """Per position, the share of documents whose code is the T5's greedy choice among that
  position's ID tokens, the decoder fed the earlier codes: 1.0 where `params`' T5 reproduces
  the codes, as the indexer whose T5 downstream runs start from should."""
  starts = module.layout.position_starts

  def agree(p, x, c):
    _, logits_BxCxV = module.apply(indexer.variables(p), x, c, enable_dropout=False,
                                   method=indexer.SemanticIndexer.represent)
    greedy_BxC = jnp.stack([
        jnp.argmax(logits_BxCxV[:, t, starts[t]:starts[t] + k], axis=-1)
        for t, k in enumerate(module.config.codebook_sizes)], axis=1)
    return (greedy_BxC == c).astype(jnp.float32)

  agree_NxC = _map_corpus(agree, params, tokens_NxL, codes_NxC, partitioner, batch_size)
  return [float(a) for a in agree_NxC.mean(axis=0)]


def decoded_features(
    module: indexer.SemanticIndexer, params: Any, tokens_NxL: np.ndarray,
    prefix_codes_NxP: np.ndarray, partitioner: partitioning.Partitioner, batch_size: int,
    feature_dim: int, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
  """(h_t, sqrt(p(token | ID))) of every document from one pass of the T5
  (`SemanticIndexer.id_token_distribution`), float32 [N, D] and [N, min(V, feature_dim)]:
  Euclidean distances between the features are Hellinger distances, kept approximately by a
  seeded Gaussian projection when V > feature_dim."""
  vocab_size = module.t5_config.vocab_size
  projection_VxF = None
  if vocab_size > feature_dim:
    rng = np.random.default_rng(seed)
    projection_VxF = (rng.standard_normal((vocab_size, feature_dim)) / np.sqrt(feature_dim)
                      ).astype(np.float32)

  def features(p, x, c, *projection):
    probs_BxV, h_BxD = module.apply(indexer.variables(p), x, c,
                                    method=indexer.SemanticIndexer.id_token_distribution)
    root_BxF = jnp.sqrt(probs_BxV) @ projection[0] if projection else jnp.sqrt(probs_BxV)
    return jnp.concatenate([h_BxD, root_BxF], axis=1)  # One [N, D + F] output to split.

  extra = () if projection_VxF is None else (projection_VxF,)
  both_NxDF = _map_corpus(features, params, tokens_NxL, prefix_codes_NxP, partitioner,
                          batch_size, *extra)
  emb_dim = module.t5_config.emb_dim
  return both_NxDF[:, :emb_dim], both_NxDF[:, emb_dim:]


@dataclasses.dataclass(frozen=True)
class InitialCodebook:
  """What the kmeans_t stage gives the quantized stage.

  Attributes:
    codebook_KxD: E_t.
    kmeans_codes_N: the k-means clusters, the codes the quantized stage holds documents at
      (code commitment).
    start_codes_N: argmax h_t.E_t, the codes the quantizer gives at the start (the k-means
      clusters, except where a shared codebook cannot reproduce per-prefix clusters).
    inertia: k-means inertia (summed over the groups when clustering per prefix).
  """

  codebook_KxD: np.ndarray
  kmeans_codes_N: np.ndarray
  start_codes_N: np.ndarray
  inertia: float


def kmeans_within_groups(
    features_NxF: np.ndarray, group_N: np.ndarray, k: int, *, rng: jax.Array, num_iters: int,
    num_restarts: int, partitioner: partitioning.Partitioner | None = None,
) -> tuple[np.ndarray, float]:
  """(codes [N], summed inertia): k-means with k clusters within each group (a group of at
  most k rows: one code per row).

  Each group's clusters are numbered by matching their centres to those of one k-means over
  all rows (Hungarian, squared L2), so that a code points the same way in every group, which
  helps a codebook shared by the groups learn them.
  """
  run = functools.partial(kmeans.kmeans, num_clusters=k, num_iters=num_iters,
                          num_restarts=num_restarts, partitioner=partitioner)
  shared_KxF = np.asarray(run(features_NxF, rng=rng).centers_KxD)
  codes_N = np.zeros(len(features_NxF), np.int32)
  inertia = 0.0
  for g in np.unique(group_N):
    rows = np.flatnonzero(group_N == g)
    x_MxF = features_NxF[rows]
    if len(rows) <= k:
      local_M, centers_CxF = np.arange(len(rows)), x_MxF
    else:
      result = run(x_MxF, rng=jax.random.fold_in(rng, int(g) + 1),
                   pad_to=kmeans.size_bucket(len(rows)))
      local_M, centers_CxF = np.asarray(result.assignments_N), np.asarray(result.centers_KxD)
      inertia += float(result.inertia)
    cost_CxK = ((centers_CxF[:, None] - shared_KxF[None]) ** 2).sum(-1)
    local_ids, shared_ids = optimize.linear_sum_assignment(cost_CxK)
    number_C = np.zeros(len(centers_CxF), np.int32)
    number_C[local_ids] = shared_ids
    codes_N[rows] = number_C[local_M]
  return codes_N, inertia


def initial_codebook(
    module: indexer.SemanticIndexer, params: Any, position: int, tokens_NxL: np.ndarray,
    prefix_codes_NxP: np.ndarray, schedule: "Schedule", partitioner: partitioning.Partitioner,
    seed: int,
) -> InitialCodebook:
  """E_t and its codes from k-means (the kmeans_t stage)."""
  k = module.config.codebook_sizes[position]
  rng = jax.random.PRNGKey(seed + position)
  run_kmeans = functools.partial(
      kmeans.kmeans, num_clusters=k, rng=rng, num_iters=schedule.kmeans_iters,
      num_restarts=schedule.kmeans_restarts, partitioner=partitioner)
  if schedule.kmeans_features == "decoded":
    h_NxD, features_NxF = decoded_features(
        module, params, tokens_NxL, prefix_codes_NxP, partitioner, schedule.eval_batch_size,
        schedule.kmeans_feature_dim, seed + position)
    if position:
      # A later position splits each prefix's group, so it clusters what differs within the
      # group (as residual k-means does); whole distributions would repeat the prefix.
      group_N = metrics.prefix_clusters(prefix_codes_NxP, position)
      sums_GxF = np.zeros((group_N.max() + 1, features_NxF.shape[1]), np.float64)
      np.add.at(sums_GxF, group_N, features_NxF)
      means_GxF = sums_GxF / np.bincount(group_N)[:, None]
      features_NxF = (features_NxF - means_GxF[group_N]).astype(np.float32)
    if position and schedule.kmeans_per_prefix:
      clusters_N, inertia = kmeans_within_groups(
          features_NxF, group_N, k, rng=rng, num_iters=schedule.kmeans_iters,
          num_restarts=schedule.kmeans_restarts, partitioner=partitioner)
    else:
      result = run_kmeans(features_NxF)
      clusters_N, inertia = np.asarray(result.assignments_N), float(result.inertia)
    codebook_KxD = quantizer.fit_codebook(h_NxD, clusters_N, k,
                                          normalize=module.config.quantizer_normalize)
  else:
    h_NxD = encode_corpus(module, params, tokens_NxL, prefix_codes_NxP, partitioner,
                          schedule.eval_batch_size)
    result = run_kmeans(h_NxD, distance="cosine")
    clusters_N, inertia = np.asarray(result.assignments_N), float(result.inertia)
    codebook_KxD = codebook_from_centers(np.asarray(result.centers_KxD), h_NxD)
  start_N = quantizer.straight_through_quantize(
      h_NxD, codebook_KxD, normalize=module.config.quantizer_normalize).codes_B
  return InitialCodebook(codebook_KxD, clusters_N.astype(np.int32),
                         np.asarray(start_N, np.int32), inertia)


def assign_position(
    module: indexer.SemanticIndexer, params: Any, position: int, tokens_NxL: np.ndarray,
    prefix_codes_NxP: np.ndarray, partitioner: partitioning.Partitioner, batch_size: int,
) -> np.ndarray:
  """c_t of every document (int32 [N]): argmax of h_t, the decoder fed `prefix_codes_NxP`."""
  h_NxD = encode_corpus(module, params, tokens_NxL, prefix_codes_NxP, partitioner, batch_size)
  codebook_KxD = np.asarray(params[f"quantizers_{position}"]["codebook"])
  if module.config.quantizer_kind == quantizer.EMA_VQ:
    out = quantizer.nearest_codeword_quantize(h_NxD, codebook_KxD)
  else:
    out = quantizer.straight_through_quantize(h_NxD, codebook_KxD,
                                              normalize=module.config.quantizer_normalize)
  return np.asarray(out.codes_B, np.int32)


def tie_codebooks(params: Any, layout: vocabularies.IdLayout) -> Any:
  """After joint training: each E_t := its ID tokens' embeddings (`SemanticIndexer.tied_codebook`),
  copied back into the LM (the untied head's output columns too)."""
  embedding = np.asarray(params["t5"]["token_embedder"]["embedding"])
  for t in range(layout.num_positions):
    start, end = layout.position_range(t)
    codebook_KxD = embedding[start:end].astype(np.float32)
    params = {**params, f"quantizers_{t}": {**params[f"quantizers_{t}"], "codebook": codebook_KxD}}
    params = copy_codebook_into_vocabulary(params, codebook_KxD, layout, t)
  return params


def _stage_done(stage_dir: str) -> dict | None:
  path = os.path.join(stage_dir, "done.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _mark_done(stage_dir: str, info: dict) -> None:
  files.write_json(os.path.join(stage_dir, "done.json"), info)


def _save_params(stage_dir: str, params: Any) -> None:
  """Saves `params` where `final_params` reads them, as the stage's step-0 checkpoint."""
  directory = os.path.abspath(os.path.join(stage_dir, "checkpoints", "0", "state"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, {"params": params}, force=True)
  checkpointer.wait_until_finished()


def final_params(stage_dir: str) -> Any:
  """The parameters of a finished training stage (its last checkpoint), on the host."""
  directory = os.path.abspath(os.path.join(stage_dir, "checkpoints"))
  step = max(int(p) for p in os.listdir(directory) if p.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  return jax.tree.map(np.asarray, state["params"])


def codebook_from_centers(unit_centers_KxD: np.ndarray, h_NxD: np.ndarray) -> np.ndarray:
  """E_t from spherical k-means centres: every codeword at the mean norm of h_t.

  The quantizer (and the LM, once E_t is copied into it) picks argmax h.E_k. With codewords of
  equal norm that is the centre of largest cosine, i.e. the k-means assignment itself; centres
  of unequal norm (Euclidean k-means) would hand the largest-norm centre most documents from
  the first step, up to all of them.
  """
  scale = float(np.mean(np.linalg.norm(h_NxD, axis=-1)))
  return (unit_centers_KxD * scale).astype(np.float32)


def copy_codebook_into_vocabulary(
    params: Any, codebook_KxD: np.ndarray, layout: vocabularies.IdLayout, position: int
) -> Any:
  """E_t becomes the embeddings (and, untied, the output columns) of position t's ID tokens.

  Then the LM's logits over those tokens are h E_t^T (times a positive constant for the tied
  head), so greedy decoding restricted to them assigns the same codes as the dot-product
  quantizer (not always as the cosine one, `IndexerConfig.quantizer_normalize`).
  """
  start, end = layout.position_range(position)
  model = dict(params["t5"])
  embedding = np.array(model["token_embedder"]["embedding"])
  embedding[start:end] = codebook_KxD
  model["token_embedder"] = {**model["token_embedder"], "embedding": embedding}
  if "logits_dense" in model:
    kernel = np.array(model["logits_dense"]["kernel"])
    kernel[:, start:end] = codebook_KxD.T
    model["logits_dense"] = {**model["logits_dense"], "kernel": kernel}
  return {**params, "t5": model}


def index(
    *,
    model_dir: str,
    index_task: str,
    t5_config: t5.T5Config,
    config: indexer.IndexerConfig | None = None,
    schedule: Schedule | None = None,
    max_length: int = 64,
    partitioner: partitioning.Partitioner | None = None,
    seed: int = 0,
    hf_dir: str = "",
) -> dict | None:
  """Runs (or resumes) the whole schedule; returns the index stats, or None if preempted.

  Args:
    model_dir: where stages, `semantic_ids.tsv` and `index_stats.json` go.
    index_task: a `lmindexer.<dataset>.index` seqio task.
    t5_config: the T5's sizes; its vocab_size is replaced by base + code tokens.
    config: the method (`indexer.IndexerConfig`).
    schedule: steps and batch sizes.
    max_length: document tokens, for training and assignment alike.
    partitioner: the mesh; all devices, data-parallel, by default.
    seed: seeds parameters, batches, masks and k-means.
    hf_dir: a local Hugging Face T5 folder the T5 starts from (the paper starts from t5-base;
      `t5_config` must have its sizes, and the corpus should use its `spiece.model`); "" starts
      from random weights. The reconstructor and codebooks start fresh either way.
  """
  train.prepare_model_dir(model_dir)
  config = config or indexer.IndexerConfig()
  schedule = schedule or Schedule()
  if not schedule.progressive and config.quantizer_kind != quantizer.STRAIGHT_THROUGH:
    raise ValueError("Schedule.progressive=False (all positions at once) ties the codebooks to "
                     "the ID tokens' embeddings; it needs the straight-through quantizer, not "
                     f"{config.quantizer_kind!r}")
  if schedule.kmeans_features == "decoded" and config.quantizer_kind != quantizer.STRAIGHT_THROUGH:
    raise ValueError("Schedule.kmeans_features='decoded' fits a straight-through codebook to "
                     f"the clusters; the {config.quantizer_kind!r} quantizer picks the nearest "
                     "codeword")
  if schedule.kmeans_per_prefix and not config.code_commitment_weight:
    raise ValueError("Schedule.kmeans_per_prefix gives codes a shared codebook need not "
                     "reproduce; the quantized stage teaches them through code commitment: set "
                     "indexer.IndexerConfig.code_commitment_weight > 0")
  partitioner = partitioner or partitioning.Partitioner()
  corpus = load_corpus(index_task, max_length)
  n = len(corpus.doc_ids)
  layout = vocabularies.IdLayout(corpus.base_vocab_size, tuple(config.codebook_sizes))
  t5_config = t5_config.replace(vocab_size=layout.vocab_size)
  module = indexer.SemanticIndexer(t5_config, layout, config)
  num_positions = len(config.codebook_sizes)
  codes_NxC = np.zeros((n, 0), np.int32)
  stats: dict[str, Any] = {"num_documents": n, "t5_init": hf_dir or "scratch", "positions": []}
  _say(f"{n} documents, {max_length} tokens, codebooks {config.codebook_sizes}")

  def stage_dir(name):
    return os.path.join(model_dir, "stages", name)

  def stage(name, fn):
    """Runs `fn` unless `name` finished before; returns its recorded info (None: preempted)."""
    info = _stage_done(stage_dir(name))
    if info is None:
      info = fn()
      if info is None:
        return None
      _mark_done(stage_dir(name), info)
    return info

  def train_stage(name, spec, steps, init, learning_rate=None, code_targets_N=None):
    """Trains stage `name` to `steps` from `init` (params, a function giving them, or None: the
    trainer's initialisation), resuming, or skipped if finished.

    Returns its final parameters, or None if it was preempted.
    """
    init_fn = init if callable(init) or init is None else lambda: init

    def run():
      if steps == 0:
        # Nothing to train (the k-means-only ablation): the stage's result is `init` itself.
        if init_fn is None:
          raise ValueError(f"stage {name} needs at least one step (it has no input parameters).")
        _save_params(stage_dir(name), init_fn())
        return {}
      batches = DocumentBatches(
          corpus.tokens_NxL, schedule.batch_size, seed=seed + 7919 * len(stats["positions"]),
          # The joint stage's prefixes are its own current codes, not batch groups.
          prefix_codes_NxP=codes_NxC if spec.position and not spec.joint else None,
          num_negatives=config.num_negatives, code_targets_N=code_targets_N)
      _say(f"stage {name}: {steps} steps")
      state = train.train(
          model=indexer.IndexerModel(module, spec), train_dataset_cfg=batches,
          optimizer=optimizers.adamw(learning_rate or schedule.learning_rate, total_steps=steps,
                                     warmup_steps=max(steps // 10, 1)),
          total_steps=steps, model_dir=stage_dir(name), partitioner=partitioner,
          checkpoint_cfg=checkpoints.CheckpointConfig(schedule.checkpoint_period, keep=1),
          seed=seed, log_period=schedule.log_period,
          init_params_fn=init_fn)
      return {} if int(state.step) == steps else None

    return None if stage(name, run) is None else final_params(stage_dir(name))

  def pretrained_start():
    """Fresh parameters whose T5 is the Hugging Face folder's (code-token rows appended)."""
    model = indexer.IndexerModel(module, indexer.Stage(0, use_codebook=False))
    batch = {"encoder_input_tokens": jax.ShapeDtypeStruct((1, max_length), jnp.int32)}
    fresh = jax.jit(lambda rng: nn.unbox(model.init_params(rng, batch)))(
        jax.random.PRNGKey(seed))
    t5_params = checkpoint_import.pretrained_params(hf_dir, layout.vocab_size, seed=seed + 1)
    checkpoint_import.check_params_fit(t5_params, t5_config, hf_dir)
    return {**jax.tree.map(np.asarray, fresh), "t5": t5_params}

  # Before position 1: the reconstructor learns to read h while T5 stays as initialised.
  params = train_stage("warmup", indexer.Stage(0, use_codebook=False, freeze_t5=True),
                       schedule.warmup_steps, pretrained_start if hf_dir else None)
  if params is None:
    return None

  for t in range(num_positions):
    k = config.codebook_sizes[t]
    params = train_stage(f"nocode_{t}", indexer.Stage(t, use_codebook=False),
                         schedule.steps("nocode", t) if schedule.progressive else 0, params)
    if params is None:
      return None

    def kmeans_stage(t=t, k=k, params=params, codes_NxC=codes_NxC):
      init = initial_codebook(
          module, params, t, corpus.tokens_NxL, codes_NxC, schedule, partitioner, seed)
      files.save_array(os.path.join(stage_dir(f"kmeans_{t}"), "centers.npy"), init.codebook_KxD)
      files.save_array(os.path.join(stage_dir(f"kmeans_{t}"), "codes.npy"), init.kmeans_codes_N)

      def prefix_ami(new_N):
        return _ami_per_level(metrics.prefix_clusters(
            np.concatenate([codes_NxC, new_N[:, None]], 1), t + 1), corpus.labels_NxLv)

      # The codes k-means found and those the quantized stage starts from, to compare with the
      # codes it ends with.
      info = {"inertia": init.inertia, "kmeans_ami": prefix_ami(init.kmeans_codes_N),
              "start_ami": prefix_ami(init.start_codes_N)}
      if t == 0:
        # The two-stage baseline: k-means (same K) on the same model's warm-up representations.
        warm_h = encode_corpus(module, final_params(stage_dir("warmup")), corpus.tokens_NxL,
                               codes_NxC, partitioner, schedule.eval_batch_size)
        baseline = kmeans.kmeans(warm_h, k, rng=jax.random.PRNGKey(seed),
                                 num_iters=schedule.kmeans_iters,
                                 num_restarts=schedule.kmeans_restarts, partitioner=partitioner)
        info["kmeans_baseline_ami"] = _ami_per_level(
            np.asarray(baseline.assignments_N), corpus.labels_NxLv)
      return info

    os.makedirs(stage_dir(f"kmeans_{t}"), exist_ok=True)
    kmeans_info = stage(f"kmeans_{t}", kmeans_stage)
    if t == 0:
      stats["kmeans_baseline_ami"] = kmeans_info["kmeans_baseline_ami"]
    centers_KxD = np.load(os.path.join(stage_dir(f"kmeans_{t}"), "centers.npy"))
    with_centers = indexer.params_of(quantizer.load_centers(
        indexer.variables(params), centers_KxD, path=(f"quantizers_{t}",)))
    params = train_stage(f"quantized_{t}", indexer.Stage(t, use_codebook=True),
                         schedule.steps("quantized", t) if schedule.progressive else 0,
                         with_centers, schedule.quantized_learning_rate,
                         np.load(os.path.join(stage_dir(f"kmeans_{t}"), "codes.npy"))
                         if config.code_commitment_weight else None)
    if params is None:
      return None

    def assign_stage(t=t, params=params, codes_NxC=codes_NxC):
      codes_N = assign_position(module, params, t, corpus.tokens_NxL, codes_NxC, partitioner,
                                schedule.eval_batch_size)
      files.save_array(os.path.join(stage_dir(f"assign_{t}"), "codes.npy"), codes_N)
      return reconstruction_metrics(
          module, params, indexer.Stage(t, use_codebook=True), corpus.tokens_NxL, codes_NxC,
          schedule.eval_batch_size)

    os.makedirs(stage_dir(f"assign_{t}"), exist_ok=True)
    assign_info = stage(f"assign_{t}", assign_stage)
    codes_N = np.load(os.path.join(stage_dir(f"assign_{t}"), "codes.npy"))
    codes_NxC = np.concatenate([codes_NxC, codes_N[:, None]], axis=1).astype(np.int32)
    params = copy_codebook_into_vocabulary(
        params, np.asarray(params[f"quantizers_{t}"]["codebook"]), layout, t)
    stats["positions"].append({**_position_stats(codes_NxC, corpus.labels_NxLv, k),
                               "kmeans_ami": kmeans_info.get("kmeans_ami"),
                               "start_ami": kmeans_info.get("start_ami"),
                               **assign_info})
    _say(f"position {t + 1}: " + ", ".join(
        f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in stats["positions"][-1].items() if not isinstance(value, dict)))

  position_stages = [f"quantized_{t}" for t in range(num_positions)]
  if not schedule.progressive:
    # The ablation: every position trained at once, from the k-means codebooks just built.
    joint_steps = schedule.joint_steps
    if joint_steps is None:
      joint_steps = sum(schedule.steps("nocode", t) + schedule.steps("quantized", t)
                        for t in range(num_positions))
    params = train_stage("joint", indexer.Stage(num_positions - 1, use_codebook=True, joint=True),
                         joint_steps, params)
    if params is None:
      return None
    params = tie_codebooks(params, layout)
    position_stages = ["joint_final"] * num_positions

    def joint_assign_stage(params=params):
      _save_params(stage_dir("joint_final"), params)
      codes = np.zeros((n, 0), np.int32)
      for t in range(num_positions):
        codes_N = assign_position(module, params, t, corpus.tokens_NxL, codes, partitioner,
                                  schedule.eval_batch_size)
        codes = np.concatenate([codes, codes_N[:, None]], axis=1)
      files.save_array(os.path.join(stage_dir("joint_final"), "codes.npy"), codes)
      return reconstruction_metrics(
          module, params, indexer.Stage(num_positions - 1, use_codebook=True, joint=True),
          corpus.tokens_NxL, codes, schedule.eval_batch_size)

    os.makedirs(stage_dir("joint_final"), exist_ok=True)
    joint_info = stage("joint_final", joint_assign_stage)
    codes_NxC = np.load(os.path.join(stage_dir("joint_final"), "codes.npy")).astype(np.int32)
    # Per position: the final codes' stats; `kmeans_ami` and `start_ami` stay those of k-means.
    stats["positions"] = [
        {**_position_stats(codes_NxC[:, :t + 1], corpus.labels_NxLv, k),
         "kmeans_ami": start["kmeans_ami"], "start_ami": start["start_ami"], **joint_info}
        for t, (k, start) in enumerate(zip(config.codebook_sizes, stats["positions"],
                                           strict=True))]
    stats["progressive"] = False
    _say("joint: " + ", ".join(f"position {t + 1} ami {p['ami']}"
                               for t, p in enumerate(stats["positions"])))

  # Unique IDs: documents sharing a full ID get a disambiguation code, sized by the largest group.
  final_NxC1, disambiguation_size = semantic_ids.append_disambiguation(codes_NxC)
  stats.update(
      greedy_agreement=greedy_agreement(module, params, corpus.tokens_NxL, codes_NxC,
                                        partitioner, schedule.eval_batch_size),
      collision_rate_before_disambiguation=metrics.group_stats(codes_NxC)["collision_rate"],
      disambiguation_size=disambiguation_size,
      unique=metrics.group_stats(final_NxC1)["max_group_size"] == 1,
  )
  # The trained T5 is the indexer: downstream runs start from it (`finetune`), and `assign`
  # gives IDs to new documents with it (the manifest says how the run was set up).
  if jax.process_index() == 0:
    finetune.save_indexer_t5(model_dir, params["t5"])
    indexer_manifest.write_indexer_manifest(
        model_dir, index_task=index_task, t5_config=t5_config, config=config,
        max_length=max_length,
        base_vocabulary=seqio.get_mixture_or_task(index_task).output_features["inputs"].vocabulary,
        eval_batch_size=schedule.eval_batch_size, position_stages=position_stages)
  semantic_ids.write(os.path.join(model_dir, semantic_ids.FILE_NAME), list(corpus.doc_ids),
                     final_NxC1, codebook_sizes=config.codebook_sizes,
                     disambiguation_size=disambiguation_size)
  files.write_json(os.path.join(model_dir, "index_stats.json"), stats)
  _say(f"wrote {semantic_ids.FILE_NAME} ({n} unique IDs, disambiguation size "
       f"{disambiguation_size}) and index_stats.json to {model_dir}")
  return stats


def reconstruction_metrics(
    module: indexer.SemanticIndexer, params: Any, stage: indexer.Stage, tokens_NxL: np.ndarray,
    prefix_codes_NxP: np.ndarray, batch_size: int, max_docs: int = 1024,
) -> dict[str, float]:
  """Token cross-entropy and accuracy of rebuilding documents from their quantized ID.

  No dropout; each token row sees the other tokens under a fixed mask at the training ratio,
  over the first `max_docs` documents. Returns {recon_loss, recon_accuracy}. The accuracy is
  the argmax's: where no token is likely (made-up topic words split into pieces), the argmax is
  the most frequent piece and the accuracy that piece's share; the loss still moves.
  """
  model = indexer.IndexerModel(module, stage, eval_mask_seed=0)
  loss_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1])
  sums = {"recon_loss": 0.0, "recon_accuracy": 0.0}
  total = 0.0
  for i in range(0, min(len(tokens_NxL), max_docs), batch_size):
    batch = {"encoder_input_tokens": tokens_NxL[i:i + batch_size],
             "prefix_codes": prefix_codes_NxP[i:i + batch_size]}
    m = loss_fn(params, batch)
    tokens = float(m["reconstruction_tokens"])
    sums["recon_loss"] += float(m["reconstruction_loss"]) * tokens
    sums["recon_accuracy"] += float(m["reconstruction_accuracy"]) * tokens
    total += tokens
  return {key: value / max(total, 1.0) for key, value in sums.items()}


def _ami_per_level(clusters_N: np.ndarray, labels_NxLv: np.ndarray) -> dict[str, float]:
  return {f"level_{level + 1}": metrics.ami(clusters_N, labels_NxLv[:, level])
          for level in range(labels_NxLv.shape[1])}


def _position_stats(codes_NxC: np.ndarray, labels_NxLv: np.ndarray, k: int) -> dict[str, Any]:
  """Quality of the codes up to the last position: usage, groups, AMI per label level."""
  t = codes_NxC.shape[1]
  usage = quantizer.codebook_usage(codes_NxC[:, -1], k)
  prefix_N = metrics.prefix_clusters(codes_NxC, t)
  return {
      "codes_used": int(usage["codes_used"]),
      "usage_perplexity": float(usage["usage_perplexity"]),
      **metrics.group_stats(codes_NxC),
      "ami": _ami_per_level(prefix_N, labels_NxLv),
  }


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[index] {message}", flush=True)
