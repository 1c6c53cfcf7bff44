"""Trie-constrained beam search: the trie arrays, validity, exactness against exhaustive scoring,
the T5 adapter (cross-attention keys once per query), mesh equality and parity with Hugging Face
`generate(prefix_allowed_tokens_fn=...)`."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmindexer_jax import checkpoint_import
from lmindexer_jax import decoding
from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import vocabularies

jax.config.update("jax_numpy_rank_promotion", "raise")


# ------------------------------ Trie --------------------------------------------------------


def test_trie_arrays_by_hand():
  layout = vocabularies.IdLayout(base_size=10, codebook_sizes=(2, 3))
  # Documents 0 and 3 share the ID (0, 1).
  trie = decoding.Trie.from_codes(np.array([[0, 1], [0, 2], [1, 0], [0, 1]]), layout)
  # root 0; depth 1: (0)=1, (1)=2; depth 2: (0,1)=3, (0,2)=4, (1,0)=5.
  assert trie.depth_starts == (0, 1, 3, 6)
  np.testing.assert_array_equal(trie.first_child, [1, 3, 5, 6])
  np.testing.assert_array_equal(trie.node_code, [-1, 0, 1, 1, 2, 0])
  np.testing.assert_array_equal(trie.id_codes, [[0, 1], [0, 2], [1, 0]])
  assert trie.max_degree == (2, 2) and trie.token_starts == (10, 12) and trie.num_ids == 3
  np.testing.assert_array_equal(trie.transition_table(), [
      [1, 2, -1], [-1, 3, 4], [5, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]])
  dense = decoding.Trie.from_codes(np.array([[0, 1], [0, 2], [1, 0], [0, 1]]), layout, dense=True)
  np.testing.assert_array_equal(dense.transitions, trie.transition_table())
  assert trie.documents(0).tolist() == [0, 3] and trie.documents(2).tolist() == [2]
  child, code, valid = trie.children(jnp.array([[0, 1, 2]]), 0)
  assert child.shape == (1, 3, 2)
  np.testing.assert_array_equal(valid, [[[True, True], [True, True], [True, False]]])
  np.testing.assert_array_equal(np.where(valid, code, -1), [[[0, 1], [1, 2], [0, -1]]])
  with pytest.raises(ValueError, match="outside"):
    decoding.Trie.from_codes(np.array([[0, 3]]), layout)


# ------------------------------ A model-free logits function --------------------------------


def _toy_model(vocab_size: int, num_positions: int, batch: int, seed: int):
  """A decoder whose logits depend on the query and on every token fed so far (its state), so a
  wrong per-beam reordering changes the scores."""
  rng = np.random.default_rng(seed)
  emb_VxE = jnp.asarray(rng.normal(size=(vocab_size, 8)), jnp.float32)
  pos_CxE = jnp.asarray(rng.normal(size=(num_positions, 8)), jnp.float32)
  out_ExV = jnp.asarray(rng.normal(size=(8, vocab_size)) * 2.0, jnp.float32)
  query_BxE = jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32)

  def tokens_to_logits(state, tokens_Nx1):
    step = state["step"]
    h_NxE = state["h"] + emb_VxE[tokens_Nx1[:, 0]] * pos_CxE[step][None]
    return jnp.tanh(h_NxE) @ out_ExV, {"h": jnp.tanh(h_NxE) + h_NxE, "step": step + 1}

  return tokens_to_logits, {"h": query_BxE, "step": jnp.array(0, jnp.int32)}


def _exhaustive(tokens_to_logits, state, trie: decoding.Trie, batch: int, restricted: bool):
  """Scores of every (query, ID) pair by teacher forcing: float [B, U]."""
  ids_UxC = np.asarray(trie.id_codes)
  num_ids, num_positions = ids_UxC.shape
  tokens_UxC = ids_UxC + np.asarray(trie.token_starts)
  table = trie.transition_table()
  state = jax.tree.map(lambda x: jnp.repeat(x, num_ids, axis=0) if x.ndim else x, state)
  inputs = np.concatenate([np.zeros((num_ids, 1), np.int64), tokens_UxC[:, :-1]], axis=1)
  inputs_NxC = np.tile(inputs, (batch, 1))
  node_N = np.zeros(batch * num_ids, np.int64)
  total_N = np.zeros(batch * num_ids)
  for p in range(num_positions):
    logits_NxV, state = tokens_to_logits(state, jnp.asarray(inputs_NxC[:, p:p + 1], jnp.int32))
    logits_NxV = np.asarray(logits_NxV, np.float64)
    code_N = np.tile(ids_UxC[:, p], batch)
    start, size = trie.token_starts[p], trie.position_sizes[p]
    if restricted:
      allowed_NxK = table[node_N, :size] >= 0
      x_NxK = np.where(allowed_NxK, logits_NxV[:, start:start + size], -np.inf)
      logp_NxK = x_NxK - np.log(np.exp(x_NxK).sum(-1, keepdims=True))
    else:
      lse_N = np.log(np.exp(logits_NxV).sum(-1))
      logp_NxK = logits_NxV[:, start:start + size] - lse_N[:, None]
    total_N += logp_NxK[np.arange(len(code_N)), code_N]
    node_N = table[node_N, code_N]
  return total_N.reshape(batch, num_ids)


def _random_trie(rng: np.random.Generator, dense: bool = False):
  num_positions = int(rng.integers(1, 5))
  sizes = tuple(int(k) for k in rng.integers(1, 7, size=num_positions))
  layout = vocabularies.IdLayout(base_size=int(rng.integers(3, 12)), codebook_sizes=sizes)
  every = np.array(list(itertools.product(*[range(k) for k in sizes])))
  picked = every[rng.choice(len(every), size=int(rng.integers(1, len(every) + 1)))]  # repeats
  return decoding.Trie.from_codes(picked, layout, dense=dense), layout


@pytest.mark.parametrize("seed", range(8))
def test_random_tries_only_valid_ids_with_their_exact_scores(seed):
  rng = np.random.default_rng(seed)
  trie, layout = _random_trie(rng, dense=bool(seed % 2))
  batch, beam = 3, int(rng.integers(1, 9))
  num_return = int(rng.integers(1, beam + 1))
  normalization = decoding.NORMALIZATIONS[seed % 3 == 0]
  fn, state = _toy_model(layout.vocab_size, trie.num_positions, batch, seed)
  result = jax.jit(lambda s, t: decoding.beam_search(
      fn, s, t, batch_size=batch, beam_size=beam, num_return=num_return,
      normalization=normalization))(state, trie)
  codes, scores = np.asarray(result.codes), np.asarray(result.scores)
  valid, id_index = np.asarray(result.valid), np.asarray(result.id_index)
  assert codes.shape == (batch, num_return, trie.num_positions)
  reference = _exhaustive(fn, state, trie, batch, normalization == "restricted")
  ids = np.asarray(trie.id_codes)
  for b in range(batch):
    # Every beam alive while an ID is reachable; padding only after the valid ones.
    assert valid[b].sum() == min(num_return, trie.num_ids)
    assert not valid[b, valid[b].sum():].any()
    got = id_index[b, valid[b]]
    assert len(set(got.tolist())) == len(got)
    assert trie.is_valid(codes[b, valid[b]]).all()
    np.testing.assert_array_equal(codes[b, valid[b]], ids[got])
    # Each emitted ID's score is its true sequence score, best first.
    np.testing.assert_allclose(scores[b, valid[b]], reference[b, got], atol=1e-4, rtol=1e-5)
    assert (np.diff(scores[b, valid[b]]) <= 1e-6).all()
    assert np.isneginf(scores[b, ~valid[b]]).all() and (codes[b, ~valid[b]] == -1).all()
    assert (id_index[b, ~valid[b]] == -1).all()


@pytest.mark.parametrize("normalization,dense", [("full", False), ("restricted", True)])
def test_wide_beam_equals_exhaustive_ranking(normalization, dense):
  rng = np.random.default_rng(7)
  layout = vocabularies.IdLayout(base_size=5, codebook_sizes=(4, 3, 5))
  every = np.array(list(itertools.product(range(4), range(3), range(5))))
  trie = decoding.Trie.from_codes(every[rng.choice(60, 23, replace=False)], layout, dense=dense)
  batch = 4
  fn, state = _toy_model(layout.vocab_size, 3, batch, 1)
  # 30 beams > 23 IDs: the search is exhaustive; the last 7 entries are padding.
  result = jax.jit(lambda s, t: decoding.beam_search(
      fn, s, t, batch_size=batch, beam_size=30, normalization=normalization))(state, trie)
  reference = _exhaustive(fn, state, trie, batch, normalization == "restricted")
  order = np.argsort(-reference, axis=1, kind="stable")
  np.testing.assert_array_equal(np.asarray(result.id_index)[:, :23], order)
  np.testing.assert_allclose(np.asarray(result.scores)[:, :23],
                             np.take_along_axis(reference, order, 1), atol=1e-4)
  assert not np.asarray(result.valid)[:, 23:].any()
  # A narrow beam is not exhaustive, but its best ID here is the exhaustive best.
  narrow = decoding.beam_search(fn, state, trie, batch_size=batch, beam_size=5,
                                normalization=normalization)
  np.testing.assert_array_equal(np.asarray(narrow.id_index)[:, 0], order[:, 0])


def test_covered_nodes_close_over_whole_subtrees():
  layout = vocabularies.IdLayout(base_size=10, codebook_sizes=(2, 3))
  # root 0; depth 1: (0)=1, (1)=2; leaves (0,1)=3 [ID 0], (0,2)=4 [ID 1], (1,0)=5 [ID 2].
  trie = decoding.Trie.from_codes(np.array([[0, 1], [0, 2], [1, 0]]), layout)
  assert trie.covered_nodes([0]).tolist() == [3]
  assert trie.covered_nodes([1, 0, 1]).tolist() == [1, 3, 4]
  assert trie.covered_nodes([2]).tolist() == [2, 5]
  assert trie.covered_nodes([0, 1, 2]).tolist() == [0, 1, 2, 3, 4, 5]
  assert trie.covered_nodes([]).tolist() == []


@pytest.mark.parametrize("seed", range(6))
def test_excluded_ids_are_never_returned_and_do_not_cost_beams(seed):
  rng = np.random.default_rng(seed)
  trie, layout = _random_trie(rng, dense=bool(seed % 2))
  batch, beam = 3, int(rng.integers(1, 9))
  fn, state = _toy_model(layout.vocab_size, trie.num_positions, batch, seed)
  banned = [[], *(rng.choice(trie.num_ids, size=int(rng.integers(1, trie.num_ids + 1)),
                             replace=False).tolist() for _ in range(batch - 1))]
  covered = [trie.covered_nodes(ids) for ids in banned]
  excluded = np.full((batch, max(map(len, covered))), -1, np.int32)
  for b, nodes in enumerate(covered):
    excluded[b, :len(nodes)] = nodes

  def search(width, excluded_nodes_BxH=None):
    return jax.jit(lambda s, t, e: decoding.beam_search(
        fn, s, t, batch_size=batch, beam_size=width, excluded_nodes_BxH=e))(
            state, trie, excluded_nodes_BxH)

  plain, masked = search(beam), search(beam, excluded)
  exhaustive = search(trie.num_ids, excluded)
  reference = _exhaustive(fn, state, trie, batch, False)
  for b in range(batch):
    got = np.asarray(masked.id_index)[b][np.asarray(masked.valid)[b]]
    assert not set(banned[b]) & set(got.tolist())
    # No beam is lost to a prefix with only excluded IDs below it.
    assert len(got) == min(beam, trie.num_ids - len(banned[b]))
    np.testing.assert_allclose(np.asarray(masked.scores)[b][:len(got)], reference[b, got],
                               atol=1e-4, rtol=1e-5)
    # A beam as wide as the trie: the exhaustive ranking without the excluded IDs.
    order = [u for u in np.argsort(-reference[b], kind="stable").tolist()
             if u not in banned[b]]
    assert np.asarray(exhaustive.id_index)[b][:len(order)].tolist() == order
  # Nothing excluded: the plain search.
  np.testing.assert_array_equal(np.asarray(plain.id_index)[0], np.asarray(masked.id_index)[0])


def test_rejects_bad_arguments():
  layout = vocabularies.IdLayout(base_size=5, codebook_sizes=(2,))
  trie = decoding.Trie.from_codes(np.array([[0], [1]]), layout)
  fn, state = _toy_model(layout.vocab_size, 1, 1, 0)
  with pytest.raises(ValueError, match="num_return"):
    decoding.beam_search(fn, state, trie, batch_size=1, beam_size=2, num_return=3)
  with pytest.raises(ValueError, match="normalization"):
    decoding.beam_search(fn, state, trie, batch_size=1, normalization="softmax")


def test_ranked_documents_share_or_not():
  layout = vocabularies.IdLayout(base_size=5, codebook_sizes=(2, 2))
  # Rows 0 and 2 share the ID (1, 0).
  trie = decoding.Trie.from_codes(np.array([[1, 0], [0, 1], [1, 0]]), layout)
  result = decoding.BeamSearchResult(
      codes=None, scores=None, id_index=np.array([[1, 0, -1]]),
      valid=np.array([[True, True, False]]))
  assert decoding.ranked_documents(result, trie) == [[0, 2, 1]]
  assert decoding.ranked_documents(result, trie, ["a", "b", "c"]) == [["a", "c", "b"]]
  # With a disambiguation position every ID has one document.
  layout2 = vocabularies.IdLayout(base_size=5, codebook_sizes=(2, 2), disambiguation_size=2)
  trie2 = decoding.Trie.from_codes(np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]]), layout2)
  assert [trie2.documents(u).tolist() for u in range(3)] == [[1], [0], [2]]


def test_from_semantic_ids_file(tmp_path):
  from tasks import semantic_ids

  codes, size = semantic_ids.append_disambiguation(np.array([[1, 2], [1, 2], [0, 3]]))
  path = semantic_ids.write(str(tmp_path / "semantic_ids.tsv"), ["x", "y", "z"], codes,
                            codebook_sizes=(2, 4), disambiguation_size=size)
  ids = semantic_ids.read(path)
  trie = decoding.Trie.from_semantic_ids(ids, base_size=100)
  assert trie.position_sizes == (2, 4, 2) and trie.token_starts == (100, 102, 106)
  np.testing.assert_array_equal(trie.id_codes, [[0, 3, 0], [1, 2, 0], [1, 2, 1]])
  result = decoding.BeamSearchResult(None, None, np.array([[2, 0, 1]]), np.ones((1, 3), bool))
  assert decoding.ranked_documents(result, trie, ids.doc_ids) == [["y", "z", "x"]]


# ------------------------------ T5 ----------------------------------------------------------

_BASE = 40
_SIZES = (8, 6, 5)
_LAYOUT = vocabularies.IdLayout(base_size=_BASE, codebook_sizes=_SIZES)
_VOCAB = _LAYOUT.vocab_size  # 59
QUERIES = np.array([[5, 6, 7, 8, 9, 10, 1, 0],
                    [11, 12, 1, 0, 0, 0, 0, 0],
                    [13, 14, 15, 16, 17, 18, 19, 1]], np.int32)


def _valid_codes(num: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  every = np.array(list(itertools.product(*[range(k) for k in _SIZES])))
  return every[rng.choice(len(every), num, replace=False)]


def _tiny_t5(**overrides):
  kwargs = dict(vocab_size=_VOCAB + 1, emb_dim=16, num_heads=4, num_encoder_layers=2,
                num_decoder_layers=2, head_dim=4, mlp_dim=32, dropout_rate=0.0)
  kwargs.update(overrides)
  module = t5.Transformer(t5.T5Config(**kwargs))
  # Random parameters drawn with numpy (eager initialisers compile slowly); scales large
  # enough to spread the scores, so ties do not decide rankings.
  abstract = jax.eval_shape(
      lambda: module.init(jax.random.key(0), QUERIES, QUERIES[:, :3], enable_dropout=False))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    fan_in = 1
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(leaf.shape[:2])) if "['out']" in name else leaf.shape[0]
    return rng.normal(scale=2.0 * fan_in**-0.5, size=leaf.shape).astype(np.float32)

  return module, jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract["params"]))


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_t5_cross_kv_once_per_query_equals_plain_decoding(head):
  overrides = {} if head == "tied" else dict(logits_via_embedding=False,
                                             mlp_activations=("gelu", "linear"))
  module, params = _tiny_t5(**overrides)
  tokens = np.array([[0, 41, 50], [0, 42, 51], [0, 43, 52]], np.int32)
  # Grouped: 2 decoder rows per query read the query's encoder rows, never copied.
  rows = np.repeat(tokens, 2, axis=0)
  rows[1::2, 2] = 53

  @jax.jit
  def run(params):
    v = {"params": params}
    encoded = module.apply(v, QUERIES, enable_dropout=False, method=module.encode)
    plain = module.apply(v, encoded, QUERIES, tokens, enable_dropout=False, method=module.decode)
    kv = module.apply(v, encoded, method=module.cross_attention_kv)
    reused = module.apply(v, None, QUERIES, tokens, enable_dropout=False, method=module.decode,
                          cross_kv=kv)
    grouped = module.apply(v, None, QUERIES, rows, enable_dropout=False, method=module.decode,
                           cross_kv=kv)
    copied = module.apply(v, jnp.repeat(encoded, 2, axis=0), np.repeat(QUERIES, 2, axis=0),
                          rows, enable_dropout=False, method=module.decode)
    return kv, plain, reused, grouped, copied

  kv, plain, reused, grouped, copied = run(params)
  assert len(kv) == 2 and kv[0][0].shape == (3, 8, 4, 4)
  np.testing.assert_allclose(reused, plain, atol=1e-6)
  np.testing.assert_allclose(grouped, copied, atol=1e-5)


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_t5_candidate_head_equals_restricted_full_logits(head):
  overrides = {} if head == "tied" else dict(logits_via_embedding=False)
  module, params = _tiny_t5(**overrides)
  trie = decoding.Trie.from_codes(_valid_codes(50, 0), _LAYOUT)

  @jax.jit
  def run(params):
    fns = decoding.t5_decoding_fns(module, params, QUERIES, 3)
    kwargs = dict(batch_size=3, beam_size=6, normalization="restricted")
    with_candidates = decoding.beam_search(
        fns.tokens_to_logits, fns.initial_state, trie,
        tokens_to_candidate_logits=fns.tokens_to_candidate_logits, **kwargs)
    from_full = decoding.beam_search(fns.tokens_to_logits, fns.initial_state, trie, **kwargs)
    exact = decoding.beam_search(fns.tokens_to_logits, fns.initial_state, trie,
                                 **dict(kwargs, normalization="full"))
    return with_candidates, from_full, exact

  a, b, exact = run(params)
  np.testing.assert_array_equal(a.codes, b.codes)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
  # The prepared head of `IdDecoder` gives the same.
  prepared = decoding.IdDecoder(module, params, trie, beam_size=6, normalization="restricted")
  c = prepared(QUERIES)
  np.testing.assert_array_equal(c.codes, a.codes)
  np.testing.assert_allclose(c.scores, a.scores, atol=1e-5)
  assert (np.asarray(exact.scores) < np.asarray(a.scores)).all()  # less mass shared out


def test_cost_analysis_counts_the_full_head_only_in_exact_mode():
  module, params = _tiny_t5()
  trie = decoding.Trie.from_codes(_valid_codes(50, 0), _LAYOUT)
  flops = {mode: decoding.IdDecoder(module, params, trie, beam_size=6, normalization=mode)
           .cost_analysis(QUERIES)["flops"] for mode in decoding.NORMALIZATIONS}
  # Decoder rows per step: 1 per query, then 6 beams per query; exact scores take every row
  # through the [D, V] head, the restricted head only through its position's K columns.
  rows = np.array([3, 18, 18])
  emb_dim, vocab_size = module.config.emb_dim, module.config.vocab_size
  full_head = 2 * emb_dim * vocab_size * rows.sum()
  restricted_head = 2 * emb_dim * (rows * np.array(_SIZES)).sum()
  assert flops["full"] - flops["restricted"] >= full_head - restricted_head > 0


def test_t5_beam_search_equals_exhaustive_scores():
  module, params = _tiny_t5()
  trie = decoding.Trie.from_codes(_valid_codes(12, 1), _LAYOUT)
  result = decoding.decode_ids(module, params, QUERIES, trie, beam_size=16, num_return=12)
  ids = np.asarray(trie.id_codes)
  tokens = np.concatenate([np.zeros((12, 1), np.int64), (ids + trie.token_starts)[:, :-1]], 1)

  @jax.jit
  def teacher_forced(params):  # every (query, ID): 12 cache rows per query, query-major
    fns = decoding.t5_decoding_fns(module, params, QUERIES, 3)
    state = decoding.gather_beams(fns.initial_state, jnp.zeros((3, 12), jnp.int32))
    logps = []
    for p in range(3):
      logits, state = fns.tokens_to_logits(state, np.tile(tokens[:, p:p + 1], (3, 1)))
      logps.append(jax.nn.log_softmax(logits))
    return logps

  total = np.zeros(36)
  for p, logp in enumerate(teacher_forced(params)):
    total += np.asarray(logp)[np.arange(36), np.tile(ids[:, p] + trie.token_starts[p], 3)]
  total = total.reshape(3, 12)
  order = np.argsort(-total, axis=1)
  np.testing.assert_array_equal(np.asarray(result.id_index), order)
  np.testing.assert_allclose(result.scores, np.take_along_axis(total, order, 1), atol=1e-4)


def test_decode_ids_on_8_device_mesh_equals_one_device():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  module, params = _tiny_t5(vocab_size=_VOCAB + 1)
  trie = decoding.Trie.from_codes(_valid_codes(70, 2), _LAYOUT)
  queries = np.concatenate([QUERIES, QUERIES[:, ::-1], QUERIES[:2] + 1], axis=0)  # B = 8
  single = decoding.decode_ids(module, params, queries, trie, beam_size=7, num_return=5,
                               partitioner=partitioning.Partitioner(num_devices=1))
  for num_partitions in (1, 2):
    partitioner = partitioning.Partitioner(num_partitions=num_partitions)
    sharded = decoding.decode_ids(module, params, queries, trie, beam_size=7, num_return=5,
                                  partitioner=partitioner)
    assert len(sharded.codes.sharding.device_set) == 8
    assert sharded.scores.sharding.shard_shape((8, 5)) == (8 // (8 // num_partitions), 5)
    np.testing.assert_array_equal(sharded.codes, single.codes)
    # float32 sums of log-probs near -12 differ in their last bits with the partitioning.
    np.testing.assert_allclose(sharded.scores, single.scores, rtol=2e-6, atol=1e-5)
  # Excluded nodes are split over `data` with their queries.
  banned = np.asarray(single.id_index)[:, :2]
  excluded = np.stack([trie.covered_nodes(ids) for ids in banned])  # 2 leaves each
  single = decoding.decode_ids(module, params, queries, trie, beam_size=7, num_return=5,
                               partitioner=partitioning.Partitioner(num_devices=1),
                               excluded_nodes_BxH=excluded)
  sharded = decoding.decode_ids(module, params, queries, trie, beam_size=7, num_return=5,
                                partitioner=partitioning.Partitioner(num_partitions=2),
                                excluded_nodes_BxH=excluded)
  np.testing.assert_array_equal(sharded.codes, single.codes)
  assert not (np.asarray(single.id_index)[:, :, None] == banned[:, None]).any()


# ------------------------------ Hugging Face parity -----------------------------------------


def _hf_prefix_fn(trie: decoding.Trie):
  """The reference implementation's decoder: a dict trie of token prefixes (after the start
  token) -> allowed next tokens, walked by `prefix_allowed_tokens_fn`."""
  tokens = np.asarray(trie.id_codes) + np.asarray(trie.token_starts)
  allowed: dict[tuple[int, ...], set[int]] = {}
  for row in tokens.tolist():
    for p in range(len(row)):
      allowed.setdefault(tuple(row[:p]), set()).add(row[p])
  allowed = {k: sorted(v) for k, v in allowed.items()}

  def fn(batch_id, sent):
    prefix = tuple(sent.tolist()[1:])
    if prefix in allowed:
      return allowed[prefix]
    # A padding beam HF keeps with score -inf: any token of the position, never ranked.
    start, end = _LAYOUT.position_range(len(prefix))
    return list(range(start, end))

  return fn


def test_matches_hf_generate_with_prefix_allowed_tokens(tmp_path):
  beam_size, num_return = 6, 4
  torch.manual_seed(0)
  hf_config = transformers.T5Config(
      vocab_size=_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  hf_model = transformers.T5ForConditionalGeneration(hf_config).eval()
  hf_model.save_pretrained(str(tmp_path))
  cfg, params = checkpoint_import.load_checkpoint(str(tmp_path))
  module = t5.Transformer(cfg)
  trie = decoding.Trie.from_codes(_valid_codes(60, 3), _LAYOUT)
  assert trie.max_degree[0] >= beam_size  # no padding beams, so HF's -1e9 beams never surface

  ours = decoding.decode_ids(module, params, QUERIES, trie, beam_size=beam_size,
                             num_return=num_return)
  with torch.no_grad():
    out = hf_model.generate(
        input_ids=torch.tensor(QUERIES, dtype=torch.long),
        attention_mask=torch.tensor(QUERIES > 0, dtype=torch.long),
        num_beams=beam_size, num_return_sequences=num_return, max_new_tokens=3,
        length_penalty=0.0, do_sample=False, prefix_allowed_tokens_fn=_hf_prefix_fn(trie),
        output_scores=True, return_dict_in_generate=True)
  sequences = out.sequences.numpy().reshape(3, num_return, -1)
  assert sequences.shape[-1] == 4 and (sequences[..., 0] == 0).all()  # start + exactly 3 codes
  hf_codes = sequences[..., 1:] - np.asarray(trie.token_starts)
  hf_scores = out.sequences_scores.numpy().reshape(3, num_return)
  np.testing.assert_array_equal(ours.codes, hf_codes)
  np.testing.assert_allclose(ours.scores, hf_scores, atol=1e-4, rtol=0)
  assert (np.diff(hf_scores, axis=1) < -1e-4).all()  # distinct scores: no ties decided this
