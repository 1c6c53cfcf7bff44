"""Same-prefix sibling groups (CSR index arrays) and hard-negative sampling."""

import numpy as np

from lmindexer_jax import siblings

# Prefixes of 9 docs: groups {0,3,5,8} (code (1,2)), {1,6} ((0,4)), {2} ((3,3)), {4,7} ((1,0)).
CODES = np.array([[1, 2], [0, 4], [3, 3], [1, 2], [1, 0], [1, 2], [0, 4], [1, 0], [1, 2]])


def test_groups_are_csr_index_arrays():
  groups = siblings.build_sibling_groups(siblings.prefix_group_ids(CODES))
  assert groups.num_groups == 4
  assert sorted(groups.group_sizes().tolist()) == [1, 2, 2, 4]
  for doc in range(len(CODES)):
    members = groups.members(groups.group_of_doc_N[doc])
    assert members[groups.rank_in_group_N[doc]] == doc
    np.testing.assert_array_equal(members, np.sort(members))
    same = np.nonzero((CODES == CODES[doc]).all(-1))[0]
    np.testing.assert_array_equal(members, same)


def test_sample_siblings_never_self_and_only_group_members():
  groups = siblings.build_sibling_groups(siblings.prefix_group_ids(CODES))
  rng = np.random.default_rng(0)
  docs = np.arange(len(CODES))
  seen = {d: set() for d in docs}
  for _ in range(50):
    neg, mask = siblings.sample_siblings(rng, docs, groups, num_negatives=2)
    assert neg.shape == mask.shape == (len(docs), 2)
    for d in docs:
      valid = neg[d][mask[d]]
      same = set(np.nonzero((CODES == CODES[d]).all(-1))[0]) - {d}
      assert d not in valid
      assert set(valid) <= same
      assert len(set(valid)) == len(valid), "without replacement"
      assert mask[d].sum() == min(2, len(same))
      seen[d] |= set(valid)
  assert seen[0] == {3, 5, 8}, "every sibling of a large group gets drawn"
  assert not any(mask[2]) and (neg[2] == 2).all(), "no siblings: masked, self index"


def test_short_groups_mask_or_draw_with_replacement():
  groups = siblings.build_sibling_groups(siblings.prefix_group_ids(CODES))
  rng = np.random.default_rng(1)
  neg, mask = siblings.sample_siblings(rng, np.array([1, 2]), groups, num_negatives=4)
  np.testing.assert_array_equal(mask, [[True, False, False, False], [False] * 4])
  assert neg[0, 0] == 6
  neg, mask = siblings.sample_siblings(rng, np.array([1, 0, 2]), groups, num_negatives=4,
                                       with_replacement=True)
  assert mask[0].all() and (neg[0] == 6).all()  # reference's random.choices
  assert mask[1].all() and set(neg[1]) <= {3, 5, 8}
  assert not mask[2].any()
