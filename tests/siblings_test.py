"""The epoch order that batches same-prefix siblings together."""

import numpy as np
import pytest

from lmindexer_jax import siblings


def _runs(order, groups):
  """[(group, length)] of the maximal same-group runs along `order`."""
  runs = []
  for g in groups[order]:
    if runs and runs[-1][0] == g:
      runs[-1][1] += 1
    else:
      runs.append([g, 1])
  return runs


@pytest.mark.parametrize("chunk_size", [2, 3, 5])
def test_grouped_order_puts_siblings_in_runs(chunk_size):
  rng = np.random.default_rng(0)
  groups = rng.integers(0, 6, size=200)
  sizes = np.bincount(groups)
  firsts = set()
  for seed in range(5):
    order = siblings.grouped_order(np.random.default_rng(seed), groups, chunk_size)
    np.testing.assert_array_equal(np.sort(order), np.arange(200))  # each document once
    runs = _runs(order, groups)
    for g in range(6):
      # A group comes in at most ceil(size / chunk) runs (chunks of one group may be adjacent).
      lengths = [n for h, n in runs if h == g]
      assert len(lengths) <= -(-sizes[g] // chunk_size)
      # Full chunks: all but at most one run hold >= chunk_size documents.
      assert sum(n < chunk_size for n in lengths) <= 1
    firsts.add(tuple(order[:chunk_size]))
  assert len(firsts) == 5, "seeds shuffle the groups, their members and the chunks"


def test_grouped_order_of_chunk_one_is_a_shuffle():
  groups = np.zeros(50, int)
  order = siblings.grouped_order(np.random.default_rng(1), groups, 1)
  assert sorted(order) == list(range(50)) and list(order) != list(range(50))
  assert len(siblings.grouped_order(np.random.default_rng(1), np.zeros(0, int), 3)) == 0
  with pytest.raises(ValueError, match="chunk_size"):
    siblings.grouped_order(np.random.default_rng(1), groups, 0)
