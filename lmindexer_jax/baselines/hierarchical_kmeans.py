"""Hierarchical k-means IDs (DSI's semantically structured identifiers), fixed length.

Level t splits every group left by level t - 1 (at first, the whole corpus) into
K_t = codebook_sizes[t] clusters with k-means (`kmeans.kmeans`: k-means++, restarts); the
cluster index is the group's code at t, and each cluster is a group of level t + 1.

Small groups (DSI's stopping rule, which ends recursion at a cluster of <= c documents and
numbers them): a group with at most K_t documents is not clustered; its documents take codes
0..m-1 at position t in corpus order, and 0 at every later position. Their IDs are then already
distinct. Groups still larger than K at the last level keep colliding IDs, which the ID
pipeline's disambiguation code separates.

Cost: one `kmeans.kmeans` call per group larger than K; groups are padded to a power of two
(`kmeans.size_bucket`), so k-means compiles once per (size bucket, K), not once per group size.

Legend: N documents, D dims, C levels, K codes.
"""

from collections.abc import Sequence

from flax import struct
import jax
import numpy as np

from lmindexer_jax import kmeans


@struct.dataclass
class HierarchicalKMeansResult:
  """Codes of hierarchical k-means.

  Attributes:
    codes_NxC: int32 codes, level t in [0, codebook_sizes[t]).
    num_kmeans_runs: k-means calls (clustered groups).
    numbered_docs_C: documents numbered directly at each level (small groups).
  """

  codes_NxC: np.ndarray
  num_kmeans_runs: int
  numbered_docs_C: np.ndarray


def hierarchical_kmeans(
    x_NxD: np.ndarray,
    codebook_sizes: Sequence[int],
    *,
    seed: int,
    num_iters: int = 100,
    num_restarts: int = 3,
) -> HierarchicalKMeansResult:
  """Recursive k-means, level by level; see the module docstring for the small-group rule.

  Group g of level t (groups in a fixed order) is clustered with the key
  `fold_in(fold_in(PRNGKey(seed), t), g)`, so the result is a function of the seed.
  """
  x_NxD = np.asarray(x_NxD, np.float32)
  n = len(x_NxD)
  sizes = tuple(int(k) for k in codebook_sizes)
  codes_NxC = np.zeros((n, len(sizes)), np.int32)
  numbered_C = np.zeros(len(sizes), np.int64)
  groups = [np.arange(n)]
  runs = 0
  for t, k in enumerate(sizes):
    level_rng = jax.random.fold_in(jax.random.PRNGKey(seed), t)
    children = []
    for g, idx in enumerate(groups):
      if len(idx) <= k:
        codes_NxC[idx, t] = np.arange(len(idx))
        numbered_C[t] += len(idx)
        continue
      result = kmeans.kmeans(x_NxD[idx], k, rng=jax.random.fold_in(level_rng, g),
                             num_iters=num_iters, num_restarts=num_restarts,
                             pad_to=kmeans.size_bucket(len(idx)))
      a_M = np.asarray(result.assignments_N, np.int32)
      runs += 1
      codes_NxC[idx, t] = a_M
      children.extend(idx[a_M == c] for c in range(k) if (a_M == c).any())
    groups = children
  return HierarchicalKMeansResult(codes_NxC, runs, numbered_C)
