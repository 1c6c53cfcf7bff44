"""Same-prefix sibling groups and hard-negative sampling, on the host with numpy.

At ID position t > 1 each document's hard negatives are documents that share its assigned prefix
c_1..c_(t-1). The groups are index arrays in CSR form (`group_offsets`, `group_members`), so
memory is O(N) documents; the reference stores every sibling's token list on every line
(O(group^2)). Sampling returns document indices; the input pipeline looks the tokens up.

Shape letters: N documents, G groups, B batch, N_neg negatives per document, P prefix length.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SiblingGroups:
  """Documents grouped by prefix, CSR style.

  Attributes:
    group_of_doc_N: int64 group index of each document.
    group_offsets_Gp1: group g's members are `group_members_N[offsets[g]:offsets[g + 1]]`.
    group_members_N: document indices, grouped, ascending within each group.
    rank_in_group_N: position of each document within its group's member slice.
  """

  group_of_doc_N: np.ndarray
  group_offsets_Gp1: np.ndarray
  group_members_N: np.ndarray
  rank_in_group_N: np.ndarray

  @property
  def num_groups(self) -> int:
    return len(self.group_offsets_Gp1) - 1

  def group_sizes(self) -> np.ndarray:
    return np.diff(self.group_offsets_Gp1)

  def members(self, group: int) -> np.ndarray:
    return self.group_members_N[self.group_offsets_Gp1[group]:self.group_offsets_Gp1[group + 1]]


def prefix_group_ids(codes_NxP: np.ndarray) -> np.ndarray:
  """One int group id per document, equal iff the documents' code prefixes are equal."""
  codes_NxP = np.asarray(codes_NxP)
  if codes_NxP.ndim != 2:
    raise ValueError(f"codes must be [num_docs, prefix_length], got {codes_NxP.shape}.")
  _, group_ids_N = np.unique(codes_NxP, axis=0, return_inverse=True)
  return group_ids_N.reshape(-1)


def build_sibling_groups(group_ids_N: np.ndarray) -> SiblingGroups:
  """Groups documents 0..N-1 by `group_ids_N` (any ints, e.g. from `prefix_group_ids`)."""
  group_ids_N = np.asarray(group_ids_N)
  if group_ids_N.ndim != 1:
    raise ValueError(f"group_ids must be 1-D, got shape {group_ids_N.shape}.")
  _, group_of_doc_N = np.unique(group_ids_N, return_inverse=True)
  group_of_doc_N = group_of_doc_N.reshape(-1).astype(np.int64)
  # A stable sort keeps members ascending by document index within each group.
  group_members_N = np.argsort(group_of_doc_N, kind="stable").astype(np.int64)
  counts_G = np.bincount(group_of_doc_N, minlength=group_of_doc_N.max(initial=-1) + 1)
  group_offsets_Gp1 = np.concatenate([[0], np.cumsum(counts_G)]).astype(np.int64)
  rank_in_group_N = np.empty_like(group_members_N)
  rank_in_group_N[group_members_N] = (np.arange(len(group_members_N))
                                      - group_offsets_Gp1[group_of_doc_N[group_members_N]])
  return SiblingGroups(group_of_doc_N, group_offsets_Gp1, group_members_N, rank_in_group_N)


def sample_siblings(rng: np.random.Generator, doc_indices_B: np.ndarray, groups: SiblingGroups,
                    num_negatives: int, *, with_replacement: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Samples up to `num_negatives` same-group documents per document, never the document itself.

  With at least `num_negatives` siblings they are drawn without replacement. With fewer
  (default): every sibling once, the remaining slots masked (so a doc without siblings has an
  all-False mask row and `losses.prefix_contrastive_loss` leaves it out). With
  `with_replacement=True`, a doc with 1..num_negatives-1 siblings fills all slots by drawing
  with replacement (the reference's `random.choices`); docs without siblings are still masked.

  Args:
    rng: numpy Generator (host side; seed it per step for reproducible input pipelines).
    doc_indices_B: int document indices (into the arrays `groups` was built from).
    groups: `build_sibling_groups` output.
    num_negatives: N_neg, slots per document (the reference: 4).
    with_replacement: see above.

  Returns:
    (neg_indices_BxN int64, neg_mask_BxN bool). Masked slots hold the document's own index, so
    gathering them is always in range; their content must be ignored through the mask.
  """
  doc_indices_B = np.asarray(doc_indices_B, np.int64).reshape(-1)
  batch = len(doc_indices_B)
  neg_indices_BxN = np.repeat(doc_indices_B[:, None], num_negatives, axis=1)
  neg_mask_BxN = np.zeros((batch, num_negatives), bool)
  groups_B = groups.group_of_doc_N[doc_indices_B]
  starts_B = groups.group_offsets_Gp1[groups_B]
  num_siblings_B = groups.group_offsets_Gp1[groups_B + 1] - starts_B - 1
  ranks_B = groups.rank_in_group_N[doc_indices_B]
  for b in range(batch):
    m = int(num_siblings_B[b])
    if m == 0 or num_negatives == 0:
      continue
    if m >= num_negatives:
      picks = rng.choice(m, size=num_negatives, replace=False)
    elif with_replacement:
      picks = rng.integers(0, m, size=num_negatives)
    else:
      picks = rng.permutation(m)
    # Draws index the m siblings; skip over the document's own slot in its group.
    picks = picks + (picks >= ranks_B[b])
    n = len(picks)
    neg_indices_BxN[b, :n] = groups.group_members_N[starts_B[b] + picks]
    neg_mask_BxN[b, :n] = True
  return neg_indices_BxN, neg_mask_BxN
