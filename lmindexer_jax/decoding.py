"""Trie-constrained beam search over semantic IDs, in one jitted XLA program.

A model may only emit the IDs of an ID file: at step p every beam extends its prefix by one code
that a valid ID continues it with. The valid IDs live in a prefix `Trie` stored as arrays, so
the mask is a gather inside the compiled loop (no host callback per step, unlike Hugging Face's
`prefix_allowed_tokens_fn`).

The search (`beam_search`) knows nothing about the model. Like t5x's `decoding.py` it takes a
tokens-to-logits function `fn(state, tokens_Nx1) -> (logits_NxV, state)`, whose state (a decoder
cache) is reordered per beam by a gather function; `t5_decoding_fns` builds those functions for
`t5.Transformer`, and `decode_ids` puts both together under jit on a mesh.

Scores are sums of log-probabilities. `normalization='full'` (exact, what HF scores) takes the
log-softmax over the whole vocabulary at each step, then keeps the allowed codes;
`normalization='restricted'` (a "restricted head") normalises over the allowed codes of the
beam's trie node only, which also spares the model the full vocabulary projection.

Shape letters: B queries, W beams per query, N decoder rows (B * beams alive), C ID positions,
D children window of a trie node, V vocabulary, R returned IDs, L encoder length, U unique IDs.
"""

from collections.abc import Callable
from collections.abc import Sequence
import contextlib
import functools
from typing import Any
from typing import NamedTuple

from flax import linen as nn
from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import vocabularies

# (state, tokens_Nx1) -> (logits_NxV, state), t5x's `tokens_to_logits`.
TokensToLogits = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
# (state, tokens_Nx1, candidate_tokens_NxD, (start, end)) -> (candidate_logits_NxD, state); every
# candidate lies in the static token range [start, end) of the position being decoded.
TokensToCandidateLogits = Callable[[Any, jax.Array, jax.Array, tuple[int, int]],
                                   tuple[jax.Array, Any]]
# (state, parent_BxW) -> state: row (b, w) of the new state is row (b, parent[b, w]) of the old.
GatherFn = Callable[[Any, jax.Array], Any]

NORMALIZATIONS = ("full", "restricted")


@struct.dataclass
class Trie:
  """Prefix trie of the valid IDs, as arrays (a pytree: pass it to jitted functions).

  Nodes are numbered breadth-first with children in code order: node 0 is the root, the nodes
  of depth p (prefixes of p codes) are `[depth_starts[p], depth_starts[p + 1])`, and the leaves
  (depth C, whole IDs) come last in the lexicographic order of their IDs, so leaf n is ID index
  `n - depth_starts[C]`, the row of `id_codes`. Because of that numbering the children of node
  n are the contiguous nodes `first_child[n] .. first_child[n + 1] - 1` (a CSR list needing no
  separate child array), reached by the codes `node_code` of those nodes. Memory is two int32
  per node, O(U * C) whatever the codebook sizes; a beam's allowed continuations are a window
  of `max_degree[p]` entries read at its node.

  `transitions` is the optional dense node-by-code table (int32 [num_nodes, max_codes], -1
  where no child; see `from_codes(dense=True)`), O(num_nodes * max_codes): fine for small
  codebooks, used by the search instead of the CSR window when present.

  Documents: documents `doc_rows[doc_offsets[u]:doc_offsets[u + 1]]` (rows of the codes the
  trie was built from, in their order) have ID u. Several rows share an ID when the IDs have no
  disambiguation position; with one, every ID has exactly one document.
  """

  first_child: jax.Array  # int32 [depth_starts[C] + 1]
  node_code: jax.Array  # int32 [num_nodes]; the code of the edge into the node (-1 at the root)
  id_codes: jax.Array  # int32 [U, C]
  doc_offsets: jax.Array  # int32 [U + 1]
  doc_rows: jax.Array  # int32 [num_docs]
  transitions: jax.Array | None = None  # int32 [num_nodes, max_codes] or None
  depth_starts: tuple[int, ...] = struct.field(pytree_node=False, default=())  # C + 2 entries
  max_degree: tuple[int, ...] = struct.field(pytree_node=False, default=())  # per depth < C
  token_starts: tuple[int, ...] = struct.field(pytree_node=False, default=())  # per position
  position_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=())

  @property
  def num_positions(self) -> int:
    return len(self.position_sizes)

  @property
  def num_nodes(self) -> int:
    return self.depth_starts[-1]

  @property
  def num_ids(self) -> int:
    return self.depth_starts[-1] - self.depth_starts[-2]

  @classmethod
  def from_codes(cls, codes_NxC: np.ndarray, layout: vocabularies.IdLayout, *,
                 dense: bool = False) -> "Trie":
    """Builds the trie of the rows of `codes_NxC` (repeated rows: documents sharing an ID).

    Args:
      codes_NxC: int codes, one row per document; position p's code c is the vocabulary token
        `layout.token_id(p, c)`.
      layout: where each position's tokens are; its `num_positions` must be C.
      dense: also build the dense `transitions` table (and search with it).
    """
    codes_NxC = np.asarray(codes_NxC)
    if codes_NxC.ndim != 2 or not len(codes_NxC):
      raise ValueError(f"codes must be a non-empty [N, C] array, got shape {codes_NxC.shape}")
    num_positions = codes_NxC.shape[1]
    if layout.num_positions != num_positions:
      raise ValueError(f"{num_positions} codes per ID but the layout has {layout.num_positions} "
                       f"positions {layout.position_sizes}")
    sizes = np.asarray(layout.position_sizes)
    if (codes_NxC < 0).any() or (codes_NxC >= sizes).any():
      raise ValueError(f"codes outside [0, size) for position sizes {layout.position_sizes}")
    id_codes_UxC, id_of_doc_N = np.unique(codes_NxC.astype(np.int64), axis=0, return_inverse=True)
    id_of_doc_N = id_of_doc_N.reshape(-1)
    num_ids = len(id_codes_UxC)
    # Row u opens a new depth-p prefix iff it differs from row u - 1 within the first p codes.
    differs_UxC = np.ones((num_ids, num_positions), bool)
    differs_UxC[1:] = np.cumsum(id_codes_UxC[1:] != id_codes_UxC[:-1], axis=1) > 0
    depth_starts = [0, 1]
    node_codes = [np.array([-1])]
    first_children = []
    prefix_U = np.zeros(num_ids, np.int64)  # local node index of each row's depth-(p-1) prefix
    max_degree = []
    for p in range(num_positions):
      opens_U = differs_UxC[:, p]
      local_U = np.cumsum(opens_U) - 1  # local index of each row's depth-(p+1) node
      parents = prefix_U[opens_U]  # nondecreasing: parent (local, depth p) of each new node
      num_parents = depth_starts[-1] - depth_starts[-2]
      counts = np.bincount(parents, minlength=num_parents)
      max_degree.append(int(counts.max()))
      child_start = depth_starts[-1]
      first_children.append(child_start + np.concatenate([[0], np.cumsum(counts)[:-1]]))
      node_codes.append(id_codes_UxC[opens_U, p])
      depth_starts.append(depth_starts[-1] + int(opens_U.sum()))
      prefix_U = local_U
    first_child = np.concatenate([*first_children, [depth_starts[-1]]])
    node_code = np.concatenate(node_codes)
    order = np.argsort(id_of_doc_N, kind="stable")
    doc_offsets = np.concatenate([[0], np.cumsum(np.bincount(id_of_doc_N, minlength=num_ids))])
    transitions = None
    if dense:
      transitions = jnp.asarray(_dense_table(first_child, node_code, max(layout.position_sizes)))
    return cls(
        first_child=jnp.asarray(first_child, jnp.int32),
        node_code=jnp.asarray(node_code, jnp.int32),
        id_codes=jnp.asarray(id_codes_UxC, jnp.int32),
        doc_offsets=jnp.asarray(doc_offsets, jnp.int32),
        doc_rows=jnp.asarray(order, jnp.int32),
        transitions=transitions,
        depth_starts=tuple(depth_starts),
        max_degree=tuple(max_degree),
        token_starts=tuple(layout.position_starts),
        position_sizes=tuple(layout.position_sizes),
    )

  @classmethod
  def from_semantic_ids(cls, ids: Any, base_size: int, *, dense: bool = False) -> "Trie":
    """The trie of a `tasks.semantic_ids.SemanticIds` (its codes, in corpus order).

    `base_size` is the base vocabulary size the ID tokens follow (`IdLayout.base_size`).
    """
    layout = vocabularies.IdLayout(base_size, ids.codebook_sizes, ids.disambiguation_size)
    return cls.from_codes(ids.codes, layout, dense=dense)

  def transition_table(self) -> np.ndarray:
    """The dense node-by-code table, int32 [num_nodes, max_codes], -1 where no child."""
    if self.transitions is not None:
      return np.asarray(self.transitions)
    return _dense_table(np.asarray(self.first_child), np.asarray(self.node_code),
                        max(self.position_sizes))

  def children(self, node_BxW: jax.Array, depth: int):
    """The allowed continuations of nodes of depth `depth`, in a static window of D entries.

    Returns:
      (child_BxWxD, code_BxWxD, valid_BxWxD): child node, its code, and whether the entry is a
      real child (entries past a node's children are padding with arbitrary values).
    """
    if self.transitions is not None:
      size = self.position_sizes[depth]
      child_BxWxD = self.transitions[node_BxW, :size]
      code_BxWxD = lax.broadcasted_iota(jnp.int32, child_BxWxD.shape, child_BxWxD.ndim - 1)
      return child_BxWxD, code_BxWxD, child_BxWxD >= 0
    width = self.max_degree[depth]
    start_BxW, end_BxW = self.first_child[node_BxW], self.first_child[node_BxW + 1]
    child_BxWxD = start_BxW[..., None] + lax.broadcasted_iota(
        jnp.int32, (*node_BxW.shape, width), node_BxW.ndim)
    valid_BxWxD = child_BxWxD < end_BxW[..., None]
    child_BxWxD = jnp.minimum(child_BxWxD, self.num_nodes - 1)
    return child_BxWxD, self.node_code[child_BxWxD], valid_BxWxD

  def is_valid(self, codes_NxC: np.ndarray) -> np.ndarray:
    """Whether each row of `codes_NxC` is one of the trie's IDs (host-side check)."""
    valid = {tuple(row) for row in np.asarray(self.id_codes).tolist()}
    return np.array([tuple(row) in valid for row in np.asarray(codes_NxC).tolist()], bool)

  def covered_nodes(self, id_index: Sequence[int] | np.ndarray) -> np.ndarray:
    """The nodes all of whose IDs are among `id_index` (their leaves, and every ancestor whose
    children are all covered), ascending: a search that may not return those IDs need not
    enter them (`beam_search(excluded_nodes_BxH=...)`). Host-side, O(len(id_index) * C)."""
    first_child = np.asarray(self.first_child)
    level = np.unique(np.asarray(id_index, np.int64)) + self.depth_starts[self.num_positions]
    covered = [level]
    while len(level) and level[0] > 0:  # up to the root, while a whole subtree is covered
      parent, count = np.unique(_parents(first_child, level), return_counts=True)
      level = parent[count == first_child[parent + 1] - first_child[parent]]
      covered.append(level)
    return np.sort(np.concatenate(covered))

  def documents(self, id_index: int) -> np.ndarray:
    """Rows (of the codes the trie was built from) of the documents with ID `id_index`."""
    offsets = np.asarray(self.doc_offsets)
    return np.asarray(self.doc_rows)[offsets[id_index]:offsets[id_index + 1]]


def _parents(first_child: np.ndarray, nodes: np.ndarray) -> np.ndarray:
  """The parent of each (non-root) node: the last node whose children start at or before it."""
  return np.searchsorted(first_child, nodes, side="right") - 1


def _dense_table(first_child: np.ndarray, node_code: np.ndarray, max_codes: int) -> np.ndarray:
  num_nodes = len(node_code)
  table = np.full((num_nodes, max_codes), -1, np.int32)
  children = np.arange(1, num_nodes)
  table[_parents(first_child, children), node_code[children]] = children
  return table


@struct.dataclass
class BeamSearchResult:
  """Ranked IDs per query, best first.

  Attributes:
    codes: int32 [B, R, C]; -1 in entries that are not valid IDs.
    scores: float32 [B, R], sum of log-probabilities; -inf where not valid.
    id_index: int32 [B, R], row of `Trie.id_codes`; -1 where not valid.
    valid: bool [B, R]; False only when fewer than R IDs could be reached with the beam.
  """

  codes: jax.Array
  scores: jax.Array
  id_index: jax.Array
  valid: jax.Array


def gather_beams(state: Any, parent_BxW: jax.Array) -> Any:
  """Default per-beam reordering: every leaf with a leading row axis of B * w (query-major)
  becomes B * W rows, row (b, j) taken from row (b, parent[b, j]); scalars are kept."""
  batch, _ = parent_BxW.shape

  def gather(x):
    if not hasattr(x, "ndim") or x.ndim == 0:
      return x
    x_BxWxX = x.reshape(batch, x.shape[0] // batch, *x.shape[1:])
    x_BxWxX = jax.vmap(lambda rows, parents: jnp.take(rows, parents, axis=0))(x_BxWxX, parent_BxW)
    return x_BxWxX.reshape(-1, *x.shape[1:])

  return jax.tree.map(gather, state)


def _masked_log_softmax(x: jax.Array, mask: jax.Array) -> jax.Array:
  """log_softmax over the True entries of the last axis; -inf elsewhere (and on empty rows)."""
  x = jnp.where(mask, x, -jnp.inf)
  max_x = jnp.max(x, axis=-1, keepdims=True)
  max_x = jnp.where(jnp.isfinite(max_x), max_x, 0.0)
  sum_exp = jnp.sum(jnp.where(mask, jnp.exp(x - max_x), 0.0), axis=-1, keepdims=True)
  return jnp.where(mask, x - max_x - jnp.log(sum_exp), -jnp.inf)


def _contains(sorted_BxH: jax.Array, x_BxWxD: jax.Array) -> jax.Array:
  """Whether each x[b, ...] is among sorted[b, :] (ascending rows; bool, shaped like x)."""
  x_BxM = x_BxWxD.reshape(x_BxWxD.shape[0], -1)
  at_BxM = jax.vmap(jnp.searchsorted)(sorted_BxH, x_BxM)
  at_BxM = jnp.minimum(at_BxM, sorted_BxH.shape[1] - 1)
  found_BxM = jnp.take_along_axis(sorted_BxH, at_BxM, axis=1) == x_BxM
  return found_BxM.reshape(x_BxWxD.shape)


def beam_search(
    tokens_to_logits: TokensToLogits | None,
    initial_state: Any,
    trie: Trie,
    *,
    batch_size: int,
    beam_size: int = 20,
    num_return: int | None = None,
    normalization: str = "full",
    tokens_to_candidate_logits: TokensToCandidateLogits | None = None,
    gather_fn: GatherFn = gather_beams,
    decoder_start_token: int = 0,
    excluded_nodes_BxH: jax.Array | None = None,
) -> BeamSearchResult:
  """Beam search that only emits the trie's IDs, as one traced program (jit it).

  The C positions are a Python loop unrolled under jit (C is small and static), so the number
  of rows can change: the first step runs one row per query (all beams would be equal), later
  steps `beam_size` rows per query. Each step scores every allowed child of every beam, keeps
  the `beam_size` best (score = sum of log-probabilities) and reorders the state with
  `gather_fn`. When fewer continuations exist than beams, the rest are padding beams with score
  -inf that are never returned as valid.

  Args:
    tokens_to_logits: `fn(state, tokens_Nx1) -> (logits_NxV, state)`; rows are query-major
      (row b * w + j is beam j of query b). May be None in 'restricted' mode if
      `tokens_to_candidate_logits` is given.
    initial_state: the state for the first step, `batch_size` rows (one per query).
    trie: the valid IDs.
    batch_size: number of queries B.
    beam_size: beams kept per query W.
    num_return: IDs returned per query R (<= beam_size; default beam_size).
    normalization: 'full' (log-softmax over the whole vocabulary, exact) or 'restricted'
      (over the beam's allowed codes only).
    tokens_to_candidate_logits: optional `fn(state, tokens_Nx1, candidates_NxD, (start, end))
      -> (logits_NxD, state)` giving only the logits of the candidate tokens, which all lie in
      the position's token range [start, end); used in 'restricted' mode (it never needs the
      whole vocabulary).
    gather_fn: reorders the state per beam (default `gather_beams`).
    decoder_start_token: the first decoder input token.
    excluded_nodes_BxH: optional int trie nodes (-1 = none) that query b may not enter:
      `Trie.covered_nodes` of the IDs it may not return (a user's earlier items in
      recommendation, which RecBole masks before ranking), so no beam is spent on a prefix
      with no other ID below it and the R IDs returned are the best others the beams reach.

  Returns:
    A `BeamSearchResult` with R IDs per query, best first.
  """
  num_return = beam_size if num_return is None else num_return
  if not 0 < num_return <= beam_size:
    raise ValueError(f"num_return must be in [1, beam_size={beam_size}], got {num_return}")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
  use_candidates = normalization == "restricted" and tokens_to_candidate_logits is not None
  if tokens_to_logits is None and not use_candidates:
    raise ValueError("tokens_to_logits is needed unless normalization='restricted' with "
                     "tokens_to_candidate_logits")
  batch = batch_size
  state = initial_state
  tokens_Nx1 = jnp.full((batch, 1), decoder_start_token, jnp.int32)
  node_BxW = jnp.zeros((batch, 1), jnp.int32)
  score_BxW = jnp.zeros((batch, 1), jnp.float32)
  alive_BxW = jnp.ones((batch, 1), bool)
  codes_BxWxP = jnp.zeros((batch, 1, 0), jnp.int32)
  num_positions = trie.num_positions
  if excluded_nodes_BxH is not None:
    excluded_sorted_BxH = jnp.sort(excluded_nodes_BxH, axis=1)
  for p in range(num_positions):
    width = node_BxW.shape[1]
    child_BxWxD, code_BxWxD, valid_BxWxD = trie.children(node_BxW, p)
    valid_BxWxD = valid_BxWxD & alive_BxW[..., None]
    if excluded_nodes_BxH is not None:
      valid_BxWxD = valid_BxWxD & ~_contains(excluded_sorted_BxH, child_BxWxD)
    num_children = child_BxWxD.shape[-1]
    token_BxWxD = trie.token_starts[p] + code_BxWxD
    token_NxD = token_BxWxD.reshape(batch * width, num_children)
    if use_candidates:
      token_range = (trie.token_starts[p], trie.token_starts[p] + trie.position_sizes[p])
      logits_NxD, state = tokens_to_candidate_logits(state, tokens_Nx1, token_NxD, token_range)
      logits_BxWxD = logits_NxD.astype(jnp.float32).reshape(batch, width, num_children)
    else:
      logits_NxV, state = tokens_to_logits(state, tokens_Nx1)
      logits_NxV = logits_NxV.astype(jnp.float32)
      logits_NxD = jnp.take_along_axis(logits_NxV, token_NxD, axis=-1)
      if normalization == "full":
        logits_NxD = logits_NxD - jax.nn.logsumexp(logits_NxV, axis=-1, keepdims=True)
      logits_BxWxD = logits_NxD.reshape(batch, width, num_children)
    if normalization == "full":
      logp_BxWxD = jnp.where(valid_BxWxD, logits_BxWxD, -jnp.inf)
    else:
      logp_BxWxD = _masked_log_softmax(logits_BxWxD, valid_BxWxD)
    total_BxM = (score_BxW[..., None] + logp_BxWxD).reshape(batch, width * num_children)
    valid_BxM = valid_BxWxD.reshape(batch, width * num_children)
    # Fewer candidates than beams: pad with invalid ones.
    pad = max(0, beam_size - width * num_children)
    if pad:
      total_BxM = jnp.pad(total_BxM, ((0, 0), (0, pad)), constant_values=-jnp.inf)
      valid_BxM = jnp.pad(valid_BxM, ((0, 0), (0, pad)))
    # Ranked by score, valid candidates before padding even if a score underflowed to -inf.
    lowest = jnp.finfo(jnp.float32).min
    key_BxM = jnp.where(valid_BxM, jnp.maximum(total_BxM, lowest), -jnp.inf)
    _, top_BxW = lax.top_k(key_BxM, beam_size)
    alive_BxW = jnp.take_along_axis(valid_BxM, top_BxW, axis=1)
    score_BxW = jnp.where(alive_BxW, jnp.take_along_axis(total_BxM, top_BxW, axis=1), -jnp.inf)
    top_BxW = jnp.minimum(top_BxW, width * num_children - 1)
    parent_BxW = top_BxW // num_children

    def pick(x_BxWxD, top_BxW=top_BxW):
      return jnp.take_along_axis(x_BxWxD.reshape(batch, -1), top_BxW, axis=1)

    node_BxW = pick(child_BxWxD)
    code_BxW = pick(code_BxWxD)
    codes_BxWxP = jnp.concatenate(
        [jnp.take_along_axis(codes_BxWxP, parent_BxW[..., None], axis=1), code_BxW[..., None]],
        axis=2)
    if p + 1 < num_positions:
      state = gather_fn(state, parent_BxW)
      tokens_Nx1 = pick(token_BxWxD).reshape(batch * beam_size, 1)
  alive_BxR = alive_BxW[:, :num_return]
  id_index_BxR = node_BxW[:, :num_return] - trie.depth_starts[num_positions]
  return BeamSearchResult(
      codes=jnp.where(alive_BxR[..., None], codes_BxWxP[:, :num_return], -1),
      scores=score_BxW[:, :num_return],
      id_index=jnp.where(alive_BxR, id_index_BxR, -1),
      valid=alive_BxR,
  )


class DecodingFns(NamedTuple):
  """What `beam_search` needs from a model; see `t5_decoding_fns`."""

  tokens_to_logits: TokensToLogits
  tokens_to_candidate_logits: TokensToCandidateLogits
  initial_state: Any


def t5_head(module: t5.Transformer, params: Any) -> jax.Array:
  """The LM head as a [D, V] matrix applied to the decoder's final hidden states.

  The tied head is the transposed embedding with the emb_dim**-0.5 rescale folded in. Prepare
  it once (`IdDecoder` does): XLA:CPU multiplies by a [D, V] matrix several times faster than
  by the [V, D] embedding when few rows are decoded, and transposing inside every call costs
  more than it saves.
  """
  if module.config.logits_via_embedding:
    embedding_VxD = jnp.asarray(params["token_embedder"]["embedding"], jnp.float32)
    return embedding_VxD.T * jnp.float32(module.config.emb_dim**-0.5)
  return jnp.asarray(params["logits_dense"]["kernel"], jnp.float32)


def t5_decoding_fns(module: t5.Transformer, params: Any, encoder_tokens_BxL: jax.Array,
                    num_positions: int, head_DxV: jax.Array | None = None) -> DecodingFns:
  """Builds `beam_search`'s functions for `t5.Transformer` (call it inside jit).

  The encoder runs once per query, and so do the cross-attention keys/values of every decoder
  layer (`Transformer.cross_attention_kv`): the beams of a query attend to its encoder states
  through the decoder's grouped cross-attention, never copied per beam. The state is the
  self-attention cache, sized for `num_positions` decoder inputs (start token + C - 1 codes)
  and created for one row per query; `gather_beams` grows it to the beams.

  Args:
    module: the model.
    params: its parameters.
    encoder_tokens_BxL: int queries, 0 = padding.
    num_positions: C.
    head_DxV: `t5_head(module, params)`, prepared outside the jitted call; None uses the
      model's own head.
  """
  variables = {"params": params}
  encoded_BxLxD = module.apply(variables, encoder_tokens_BxL, enable_dropout=False,
                               method=module.encode)
  cross_kv = module.apply(variables, encoded_BxLxD, method=module.cross_attention_kv)
  batch = encoder_tokens_BxL.shape[0]

  def make_cache():
    _, cache_vars = module.apply(
        variables, None, encoder_tokens_BxL, jnp.zeros((batch, num_positions), jnp.int32),
        decode=True, enable_dropout=False, mutable=["cache"], method=module.decode,
        cross_kv=cross_kv)
    return cache_vars["cache"]

  cache_shapes = jax.eval_shape(make_cache)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

  def step(cache, tokens_Nx1):
    # The model's own full-vocabulary head is computed only when its output is used (XLA
    # drops it otherwise).
    (logits_Nx1xV, hidden_Nx1xD), new_vars = module.apply(
        {"params": params, "cache": cache}, None, encoder_tokens_BxL, tokens_Nx1, decode=True,
        enable_dropout=False, mutable=["cache"], method=module.decode, cross_kv=cross_kv,
        return_hidden=True)
    return logits_Nx1xV[:, 0], hidden_Nx1xD[:, 0].astype(jnp.float32), new_vars["cache"]

  def tokens_to_logits(cache, tokens_Nx1):
    logits_NxV, hidden_NxD, cache = step(cache, tokens_Nx1)
    if head_DxV is not None:
      logits_NxV = nn.with_logical_constraint(hidden_NxD @ head_DxV, ("batch", "vocab"))
    return logits_NxV, cache

  def tokens_to_candidate_logits(cache, tokens_Nx1, candidates_NxD, token_range):
    _, hidden_NxD, cache = step(cache, tokens_Nx1)
    start, end = token_range
    # The position's slice of the head, then the candidates among its codes.
    if head_DxV is not None:
      slice_DxK = head_DxV[:, start:end]
    else:
      slice_DxK = t5_head(module, params)[:, start:end]
    logits_NxK = hidden_NxD @ slice_DxK
    return jnp.take_along_axis(logits_NxK, candidates_NxD - start, axis=1), cache

  return DecodingFns(tokens_to_logits, tokens_to_candidate_logits, cache)


def _param_shardings(module: t5.Transformer, partitioner: partitioning.Partitioner):
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(
      lambda t: module.init(jax.random.key(0), t, t, enable_dropout=False), tokens)
  return partitioner.shardings(nn.get_partition_spec(boxed["params"]))


@functools.lru_cache(maxsize=16)
def _jitted_decoder(module: t5.Transformer, beam_size: int, num_return: int | None,
                    normalization: str, partitioner: partitioning.Partitioner | None):
  def run(params, head_DxV, encoder_tokens_BxL, trie, excluded_nodes_BxH):
    fns = t5_decoding_fns(module, params, encoder_tokens_BxL, trie.num_positions, head_DxV)
    return beam_search(
        fns.tokens_to_logits, fns.initial_state, trie, batch_size=encoder_tokens_BxL.shape[0],
        beam_size=beam_size, num_return=num_return, normalization=normalization,
        tokens_to_candidate_logits=fns.tokens_to_candidate_logits,
        excluded_nodes_BxH=excluded_nodes_BxH)

  if partitioner is None:
    return jax.jit(run)
  batch = partitioner.batch_sharding
  return jax.jit(
      run,
      in_shardings=(_param_shardings(module, partitioner),
                    partitioner.sharding(jax.sharding.PartitionSpec(None, "vocab")), batch(2),
                    partitioner.replicated, batch(2)),
      out_shardings=BeamSearchResult(batch(3), batch(2), batch(2), batch(2)))


class IdDecoder:
  """Constrained beam search of a T5 over a trie's IDs, prepared once and jit-compiled.

  Places the parameters (sharded by their logical axes with a `partitioner`) and the trie
  (replicated) once, and prepares the LM head (`t5_head`); each call then runs one compiled
  program (compiled per batch shape). With a `partitioner` the queries are split over the
  `data` axis, so B must be a multiple of its size.

      decoder = IdDecoder(module, params, trie, beam_size=20)
      result = decoder(encoder_tokens_BxL)  # BeamSearchResult: codes [B, R, C], scores [B, R]

  `excluded_nodes_BxH` (see `beam_search`) compiles a second program, once per its width H.
  """

  def __init__(self, module: t5.Transformer, params: Any, trie: Trie, *, beam_size: int = 20,
               num_return: int | None = None, normalization: str = "full",
               partitioner: partitioning.Partitioner | None = None):
    if normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    self._fn = _jitted_decoder(module, beam_size, num_return, normalization, partitioner)
    self._partitioner = partitioner
    if partitioner is None:
      self._params, self._trie = jax.device_put(params), jax.device_put(trie)
      self._head = jax.jit(t5_head, static_argnums=0)(module, self._params)
    else:
      with partitioner.activate():
        self._params = jax.device_put(params, _param_shardings(module, partitioner))
        self._trie = jax.device_put(trie, partitioner.replicated)
        self._head = jax.jit(
            t5_head, static_argnums=0,
            out_shardings=partitioner.sharding(jax.sharding.PartitionSpec(None, "vocab")))(
                module, self._params)

  def _placed(self, encoder_tokens_BxL: np.ndarray | jax.Array,
              excluded_nodes_BxH: np.ndarray | jax.Array | None = None) -> tuple[Any, ...]:
    """The compiled program's arguments (call inside `_mesh()`)."""
    batch = {"tokens": np.asarray(encoder_tokens_BxL, np.int32)}
    if excluded_nodes_BxH is not None:
      batch["excluded"] = np.asarray(excluded_nodes_BxH, np.int32)
    if self._partitioner is not None:
      batch = self._partitioner.global_batch(batch)
    return self._params, self._head, batch["tokens"], self._trie, batch.get("excluded")

  def _mesh(self):
    return (contextlib.nullcontext() if self._partitioner is None
            else self._partitioner.activate())

  def __call__(self, encoder_tokens_BxL: np.ndarray | jax.Array,
               excluded_nodes_BxH: np.ndarray | jax.Array | None = None) -> BeamSearchResult:
    with self._mesh():
      return self._fn(*self._placed(encoder_tokens_BxL, excluded_nodes_BxH))

  def cost_analysis(self, encoder_tokens_BxL: np.ndarray | jax.Array) -> dict[str, float]:
    """XLA's cost estimate of one call on this batch shape ('flops', 'bytes accessed', ...),
    from the compiled program (compiles it if needed; runs nothing). With a partitioner it is
    one device's program (about an eighth of the whole on 8 devices)."""
    with self._mesh():
      cost = self._fn.lower(*self._placed(encoder_tokens_BxL)).compile().cost_analysis()
    return dict(cost[0] if isinstance(cost, list) else cost)


def decode_ids(
    module: t5.Transformer,
    params: Any,
    encoder_tokens_BxL: np.ndarray | jax.Array,
    trie: Trie,
    *,
    beam_size: int = 20,
    num_return: int | None = None,
    normalization: str = "full",
    partitioner: partitioning.Partitioner | None = None,
    excluded_nodes_BxH: np.ndarray | jax.Array | None = None,
) -> BeamSearchResult:
  """One-shot `IdDecoder(module, params, trie, ...)(encoder_tokens_BxL, excluded_nodes_BxH)`.

  The compiled program is cached per settings, but parameters are placed and the head
  prepared on every call: build an `IdDecoder` to decode many batches.

  Args:
    module: the seq2seq model.
    params: its parameters.
    encoder_tokens_BxL: int queries, 0 = padding.
    trie: the valid IDs; its token starts must match the model's vocabulary.
    beam_size: beams per query (W).
    num_return: IDs returned per query (R <= W; default W).
    normalization: 'full' (exact) or 'restricted' (see the module docstring).
    partitioner: run on its mesh (parameters sharded by logical axes, queries over `data`).
    excluded_nodes_BxH: trie nodes each query may not enter (see `beam_search`).

  Returns:
    `BeamSearchResult`: codes [B, R, C], scores [B, R], id_index, valid.
  """
  decoder = IdDecoder(module, params, trie, beam_size=beam_size, num_return=num_return,
                      normalization=normalization, partitioner=partitioner)
  return decoder(encoder_tokens_BxL, excluded_nodes_BxH)


def ranked_documents(result: BeamSearchResult, trie: Trie,
                     doc_ids: Sequence[str] | None = None) -> list[list[Any]]:
  """Per query, the documents of its ranked IDs, best ID first (host-side).

  Every document under an ID is listed (in the order of the codes the trie was built from) when
  documents share IDs; with a disambiguation position each ID has one document. Invalid
  (padding) entries are skipped.

  Args:
    result: `beam_search` / `decode_ids` output.
    trie: the trie searched.
    doc_ids: names of the rows of the codes the trie was built from (e.g.
      `SemanticIds.doc_ids`); None returns the row indices.
  """
  id_index_BxR = np.asarray(result.id_index)
  valid_BxR = np.asarray(result.valid)
  offsets, rows = np.asarray(trie.doc_offsets), np.asarray(trie.doc_rows)
  ranked = []
  for ids, valid in zip(id_index_BxR.tolist(), valid_BxR.tolist(), strict=True):
    docs = []
    for u, ok in zip(ids, valid, strict=True):
      if ok:
        docs.extend(rows[offsets[u]:offsets[u + 1]].tolist())
    ranked.append(docs if doc_ids is None else [doc_ids[i] for i in docs])
  return ranked
