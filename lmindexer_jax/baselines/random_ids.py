"""Random IDs: each position's code drawn uniformly from its codebook, independently per doc.

The floor of every ID comparison: same shape and vocabulary as learned IDs, no semantics.
Collisions are left to `semantic_ids.append_disambiguation`, as for any scheme.

Legend: N documents, C ID positions.
"""

from collections.abc import Sequence

import numpy as np


def random_codes(num_docs: int, codebook_sizes: Sequence[int], seed: int) -> np.ndarray:
  """int32 [N, C]: code c of position t uniform in [0, codebook_sizes[t]), seeded."""
  sizes = tuple(int(k) for k in codebook_sizes)
  if not sizes or min(sizes) < 1:
    raise ValueError(f"codebook_sizes must be positive, got {sizes}.")
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, k, size=num_docs) for k in sizes], axis=1).astype(np.int32)
