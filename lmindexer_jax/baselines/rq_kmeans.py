"""Residual k-means IDs (RQ-KMeans, as GRID offers): k-means per level on what is left.

Level t clusters the residuals r_t (r_0 = x) into codebook_sizes[t] centres and subtracts each
point's centre: r_{t+1} = r_t - centre_t[c_t]. Coarse levels take the big directions, later ones
refine, so similar documents share prefixes; residual norms shrink level by level.

Legend: N documents, D dims, C levels, K codes.
"""

from collections.abc import Sequence

from flax import struct
import jax
import numpy as np

from lmindexer_jax import kmeans


@struct.dataclass
class ResidualKMeansResult:
  """Codes and codebooks of residual k-means.

  Attributes:
    codes_NxC: int32 codes, level t in [0, codebook_sizes[t]).
    codebooks: float32 [K_t, D] centres per level.
    residual_norms_C1: mean L2 norm of the residuals before level 1 (the centred input, as
      k-means is translation-invariant only after level 1 takes the mean) and after each level.
  """

  codes_NxC: np.ndarray
  codebooks: tuple[np.ndarray, ...]
  residual_norms_C1: np.ndarray


def residual_kmeans(
    x_NxD: np.ndarray,
    codebook_sizes: Sequence[int],
    *,
    seed: int,
    num_iters: int = 100,
    num_restarts: int = 3,
) -> ResidualKMeansResult:
  """Runs one k-means (`kmeans.kmeans`, k-means++ with restarts) per level on the residuals."""
  r_NxD = np.asarray(x_NxD, np.float32)
  norms = [float(np.linalg.norm(r_NxD - r_NxD.mean(axis=0), axis=1).mean())]
  codes, codebooks = [], []
  for t, k in enumerate(codebook_sizes):
    result = kmeans.kmeans(r_NxD, int(k), rng=jax.random.PRNGKey(seed + 1009 * t),
                           num_iters=num_iters, num_restarts=num_restarts)
    centers_KxD = np.asarray(result.centers_KxD)
    codes_N = np.asarray(result.assignments_N, np.int32)
    r_NxD = r_NxD - centers_KxD[codes_N]
    norms.append(float(np.linalg.norm(r_NxD, axis=1).mean()))
    codes.append(codes_N)
    codebooks.append(centers_KxD)
  return ResidualKMeansResult(np.stack(codes, axis=1), tuple(codebooks), np.asarray(norms))
