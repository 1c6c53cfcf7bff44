"""IDs without semantics: random codes of the learned IDs' shape, and atomic IDs.

Random: each position's code drawn uniformly from its codebook, independently per doc; the
floor of every ID comparison (same shape and vocabulary as learned IDs). Collisions are left to
`semantic_ids.append_disambiguation`, as for any scheme. Atomic: one code per document (DSI's
atomic docids), so a model learns each document's token on its own; the control that says how
much a task gains from IDs that share prefixes at all.

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


def atomic_codes(num_docs: int, seed: int) -> np.ndarray:
  """int32 [N, 1]: a seeded random permutation of 0..N-1, one code per document."""
  if num_docs < 1:
    raise ValueError(f"num_docs must be positive, got {num_docs}.")
  return np.random.default_rng(seed).permutation(num_docs).astype(np.int32)[:, None]
