"""One job per baseline ID scheme: vectors -> codes -> unique IDs -> `semantic_ids.tsv`.

  make_ids(scheme="rqvae", model_dir=..., index_task="lmindexer.synthetic.index",
           codebook_sizes=(8, 8, 8), encoder=EncoderSource(t5_config=...))

writes, like `index_pipeline.index`, `MODEL_DIR/semantic_ids.tsv` (learned codes plus the
collision code, with codebook and disambiguation sizes in its header) and
`MODEL_DIR/id_stats.json` (per position: codes used, usage perplexity, group sizes, collision
rate and AMI of the prefix against each label level; the collision rate before
disambiguation; the scheme's own figures). Vectors computed by the encoder are kept in
`MODEL_DIR/embeddings.npy` (reusable as `vectors_path`).

Legend: N documents, D dims, C learned positions, Lv label levels.
"""

from collections.abc import Sequence
import os
import time
from typing import Any

import numpy as np

from lmindexer_jax import files
from lmindexer_jax import index_pipeline
from lmindexer_jax import metrics
from lmindexer_jax import quantizer
from lmindexer_jax import train
from lmindexer_jax.baselines import embeddings
from lmindexer_jax.baselines import hierarchical_kmeans
from lmindexer_jax.baselines import random_ids
from lmindexer_jax.baselines import rq_kmeans
from lmindexer_jax.baselines import rqvae
from tasks import semantic_ids

SCHEMES = ("random", "atomic", "hkmeans", "rqkmeans", "rqvae")
STATS_FILE = "id_stats.json"
EMBEDDINGS_FILE = "embeddings.npy"


def id_stats(codes_NxC: np.ndarray, codebook_sizes: Sequence[int],
             labels_NxLv: np.ndarray) -> dict[str, Any]:
  """Quality of learned codes (before disambiguation), per position t (prefix c_1..c_t).

  AMI is reported for the label levels with at least two labelled documents.
  """
  positions = []
  for t, k in enumerate(codebook_sizes):
    usage = quantizer.codebook_usage(codes_NxC[:, t], int(k))
    prefix_N = metrics.prefix_clusters(codes_NxC, t + 1)
    ami = {f"level_{v + 1}": metrics.ami(prefix_N, labels_NxLv[:, v])
           for v in range(labels_NxLv.shape[1]) if (labels_NxLv[:, v] >= 0).sum() >= 2}
    positions.append({
        "codes_used": int(usage["codes_used"]),
        "usage_perplexity": float(usage["usage_perplexity"]),
        **metrics.group_stats(codes_NxC[:, :t + 1]),
        "ami": ami,
    })
  return {"positions": positions,
          "collision_rate_before_disambiguation": metrics.group_stats(codes_NxC)["collision_rate"]}


def _vectors(corpus: index_pipeline.Corpus, vectors_path: str,
             encoder: embeddings.EncoderSource | None, model_dir: str) -> tuple[np.ndarray, str]:
  if vectors_path:
    return embeddings.load_vectors(vectors_path, len(corpus.doc_ids)), vectors_path
  if encoder is None:
    raise ValueError("No vectors: give vectors_path (a .npy [N, D]) or an EncoderSource.")
  vectors_NxD = embeddings.encode_corpus(encoder, corpus.tokens_NxL, corpus.base_vocab_size)
  path = os.path.join(model_dir, EMBEDDINGS_FILE)
  files.save_array(path, vectors_NxD)
  source = (f"checkpoint {encoder.checkpoint_dir}" if encoder.checkpoint_dir else
            f"hf {encoder.hf_dir}" if encoder.hf_dir else f"random init, seed {encoder.seed}")
  return vectors_NxD, f"mean-pooled T5 encoder ({source})"


def make_ids(
    *,
    model_dir: str,
    scheme: str,
    index_task: str,
    codebook_sizes: Sequence[int],
    max_length: int = 64,
    vectors_path: str = "",
    encoder: embeddings.EncoderSource | None = None,
    seed: int = 0,
    kmeans_iters: int = 100,
    kmeans_restarts: int = 3,
    rqvae_config: rqvae.RqVaeConfig | None = None,
) -> dict[str, Any]:
  """Builds one scheme's IDs for every document of `index_task`; returns the stats written.

  Args:
    model_dir: where `semantic_ids.tsv`, `id_stats.json` (and `embeddings.npy`) go.
    scheme: "random", "atomic" (one code per document), "hkmeans" (DSI), "rqkmeans" (residual
      k-means) or "rqvae" (TIGER).
    index_task: a `lmindexer.<dataset>.index` seqio task (doc ids, tokens, labels).
    codebook_sizes: K per learned position (not for "atomic": one position of N codes).
    max_length: document tokens for the encoder.
    vectors_path: a `.npy` [N, D] of vectors in corpus order; overrides `encoder`.
    encoder: the frozen T5 whose mean-pooled encoder states are the vectors.
    seed: seeds codes, k-means and the RQ-VAE.
    kmeans_iters, kmeans_restarts: Lloyd iterations and k-means++ restarts (k-means schemes).
    rqvae_config: the RQ-VAE's hyperparameters.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"Unknown ID scheme {scheme!r}; known: {', '.join(SCHEMES)}.")
  train.prepare_model_dir(model_dir)
  start = time.time()
  corpus = index_pipeline.load_corpus(index_task, max_length)
  n = len(corpus.doc_ids)
  sizes = (n,) if scheme == "atomic" else tuple(int(k) for k in codebook_sizes)
  _say(f"{scheme}: {n} documents, codebooks {sizes}")
  stats: dict[str, Any] = {"scheme": scheme, "num_documents": n, "codebook_sizes": list(sizes),
                           "seed": seed}
  if scheme == "random":
    codes_NxC = random_ids.random_codes(n, sizes, seed)
  elif scheme == "atomic":
    codes_NxC = random_ids.atomic_codes(n, seed)
  else:
    x_NxD, stats["vectors"] = _vectors(corpus, vectors_path, encoder, model_dir)
    stats["vector_dim"] = int(x_NxD.shape[1])
    _say(f"vectors {x_NxD.shape} from {stats['vectors']}")
    if scheme == "hkmeans":
      result = hierarchical_kmeans.hierarchical_kmeans(
          x_NxD, sizes, seed=seed, num_iters=kmeans_iters, num_restarts=kmeans_restarts)
      codes_NxC = result.codes_NxC
      stats.update(num_kmeans_runs=result.num_kmeans_runs,
                   numbered_docs_per_level=result.numbered_docs_C.tolist())
    elif scheme == "rqkmeans":
      result = rq_kmeans.residual_kmeans(x_NxD, sizes, seed=seed, num_iters=kmeans_iters,
                                         num_restarts=kmeans_restarts)
      codes_NxC = result.codes_NxC
      stats["mean_residual_norms"] = result.residual_norms_C1.tolist()
    else:
      config = rqvae_config or rqvae.RqVaeConfig()
      result = rqvae.train_rqvae(x_NxD, sizes, config, seed=seed)
      codes_NxC = result.codes_NxC
      losses = {k: v for k, v in result.history.items() if k.endswith("loss") and len(v)}
      tail = max(1, min(50, config.num_steps))
      stats["rqvae"] = {
          "num_steps": config.num_steps,
          **{f"first_{k}": float(v[0]) for k, v in losses.items()},
          **{f"last{tail}_{k}": float(v[-tail:].mean()) for k, v in losses.items()},
          "dead_codes_reset": int(result.history.get("dead_codes", np.zeros(0)).sum()),
      }
  stats.update(id_stats(codes_NxC, sizes, corpus.labels_NxLv))

  # Unique IDs: documents sharing a full ID get a disambiguation code, sized by the largest group.
  final_NxC1, disambiguation_size = semantic_ids.append_disambiguation(codes_NxC)
  stats.update(disambiguation_size=disambiguation_size,
               unique=metrics.group_stats(final_NxC1)["max_group_size"] == 1,
               seconds=round(time.time() - start, 1))
  semantic_ids.write(os.path.join(model_dir, semantic_ids.FILE_NAME), list(corpus.doc_ids),
                     final_NxC1, codebook_sizes=sizes, disambiguation_size=disambiguation_size)
  files.write_json(os.path.join(model_dir, STATS_FILE), stats)
  last = stats["positions"][-1]
  _say(f"wrote {semantic_ids.FILE_NAME} ({n} unique IDs, disambiguation size "
       f"{disambiguation_size}) and {STATS_FILE} to {model_dir}; collision rate before "
       f"disambiguation {stats['collision_rate_before_disambiguation']:.3f}, AMI "
       + ", ".join(f"{k} {v:.3f}" for k, v in last["ami"].items()))
  return stats


def _say(message: str) -> None:
  print(f"[ids] {message}", flush=True)
