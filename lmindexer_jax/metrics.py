"""Metric definitions, one place each: ID quality (AMI, collisions, group sizes).

Legend: N documents, C ID positions.
"""

import numpy as np
from sklearn import metrics as sk_metrics


def prefix_clusters(codes_NxC: np.ndarray, length: int) -> np.ndarray:
  """int [N]: one cluster id per distinct prefix c_1..c_length."""
  _, cluster_N = np.unique(np.asarray(codes_NxC)[:, :length], axis=0, return_inverse=True)
  return cluster_N.reshape(-1)


def ami(clusters_N: np.ndarray, labels_N: np.ndarray) -> float:
  """Adjusted mutual information of a clustering against labels; rows labelled -1 are skipped."""
  labels_N = np.asarray(labels_N)
  known = labels_N >= 0 if np.issubdtype(labels_N.dtype, np.integer) else labels_N != ""
  if known.sum() < 2:
    return float("nan")
  return float(sk_metrics.adjusted_mutual_info_score(labels_N[known], clusters_N[known]))


def group_stats(codes_NxC: np.ndarray) -> dict[str, float]:
  """Sizes of the groups of documents sharing a full ID, and the collision rate.

  collision_rate: the fraction of documents whose ID is shared with another document.
  """
  _, counts_G = np.unique(np.asarray(codes_NxC), axis=0, return_counts=True)
  n = counts_G.sum()
  return {
      "num_groups": int(len(counts_G)),
      "max_group_size": int(counts_G.max()),
      "mean_group_size": float(n / len(counts_G)),
      "collision_rate": float(counts_G[counts_G > 1].sum() / n),
  }
