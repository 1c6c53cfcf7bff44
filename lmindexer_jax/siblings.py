"""The epoch order that batches same-prefix siblings together, on the host with numpy.

At ID position t > 1 each document's hard negatives are documents that share its assigned prefix
c_1..c_(t-1). Rather than looking up and encoding extra sibling documents for every row (the
reference copies every sibling's tokens onto every line), the input pipeline orders each epoch
so that siblings arrive in the same batch (`grouped_order`): a batch's rows are then each
other's negatives, and a training step encodes each document once.

Shape letters: N documents.
"""

import numpy as np


def grouped_order(rng: np.random.Generator, group_ids_N: np.ndarray, chunk_size: int
                  ) -> np.ndarray:
  """A permutation of 0..N-1 in which same-group documents come in runs of `chunk_size`.

  Each group is shuffled and cut into chunks of `chunk_size` documents (the last one shorter);
  the chunks are then shuffled together. Cutting the result into batches puts every document
  next to at least `chunk_size - 1` siblings, when its group has that many and its chunk is not
  split by a batch boundary, and each document appears once.

  Args:
    rng: numpy Generator (seed it per epoch for a reproducible input pipeline).
    group_ids_N: int group of each document (e.g. `metrics.prefix_clusters` of the prefixes).
    chunk_size: documents per run (>= 1; 1 gives a plain shuffle).
  """
  group_ids_N = np.asarray(group_ids_N).reshape(-1)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  n = len(group_ids_N)
  if n == 0:
    return np.zeros((0,), np.int64)
  shuffled_N = rng.permutation(n)
  by_group_N = shuffled_N[np.argsort(group_ids_N[shuffled_N], kind="stable")]
  sorted_groups_N = group_ids_N[by_group_N]
  group_start_N = np.r_[True, sorted_groups_N[1:] != sorted_groups_N[:-1]]
  first_of_group_N = np.maximum.accumulate(np.where(group_start_N, np.arange(n), 0))
  chunk_start_N = (np.arange(n) - first_of_group_N) % chunk_size == 0
  chunk_of_N = np.cumsum(chunk_start_N) - 1
  chunk_rank = rng.permutation(int(chunk_start_N.sum()))
  return by_group_N[np.argsort(chunk_rank[chunk_of_N], kind="stable")]
