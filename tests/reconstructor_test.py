"""Behaviour of the reconstructor: who may attend to whom, proven through gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmindexer_jax import reconstructor as rc
from lmindexer_jax import t5

jax.config.update("jax_numpy_rank_promotion", "raise")

D = 16
# Row 0: 6 tokens and EOS; row 1: 3 tokens, EOS, padding.
TOKENS = np.array([[5, 6, 7, 8, 9, 10, 1], [11, 12, 13, 1, 0, 0, 0]], np.int32)
B, L = TOKENS.shape
INVALID = (TOKENS == 0) | (TOKENS == 1)
T5_CONFIG = t5.T5Config(vocab_size=32, emb_dim=D, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, head_dim=8, mlp_dim=32, dropout_rate=0.0)
sample_mask = jax.jit(rc.sample_reconstruction_mask, static_argnums=2)


def _embs(num_slots, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, num_slots, D)).astype(np.float32),
          rng.normal(size=(B, L, D)).astype(np.float32),
          rng.normal(size=(B, D)).astype(np.float32))


def _abstract_params(module, num_slots):
  id_embs, doc_embs, h = _embs(num_slots)
  return jax.eval_shape(functools.partial(module.init, enable_dropout=False), jax.random.key(0),
                        id_embs, TOKENS, doc_embs, continuous_h_BxD=h)["params"]


@functools.cache
def _model(num_slots, **overrides):
  """(module, params, jitted apply). Parameters drawn with numpy from `eval_shape`: compiling
  the initialisers eagerly costs seconds of CPU per config."""
  module = rc.Reconstructor(rc.ReconstructorConfig(**overrides), T5_CONFIG)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if "kernel" in name else 1
    return rng.normal(scale=fan_in**-0.5, size=leaf.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(
      draw, nn.unbox(_abstract_params(module, num_slots)))

  @jax.jit
  def apply(id_embs, doc_embs, mask=None, continuous_h=None):
    return module.apply({"params": params}, id_embs, TOKENS, doc_embs, mask,
                        enable_dropout=False, continuous_h_BxD=continuous_h)

  return module, params, apply


def test_sampled_mask_structure_and_keep_rate():
  mask = np.asarray(sample_mask(jax.random.key(0), TOKENS, 2, 0.5))
  assert mask.shape == (B, L, 2 + L) and mask.dtype == bool
  assert mask[:, :, :2].all(), "ID slots always visible"
  doc = mask[:, :, 2:]
  assert not doc[:, np.arange(L), np.arange(L)].any(), "never itself"
  assert not doc.transpose(0, 2, 1)[INVALID].any(), "padding and EOS never attended"
  # Evaluation: only the diagonal and the invalid keys are hidden.
  eval_mask = np.asarray(rc.sample_reconstruction_mask(None, TOKENS, 2, 0.7))
  eval_zero = np.asarray(sample_mask(jax.random.key(1), TOKENS, 2, 0.0))
  np.testing.assert_array_equal(eval_mask, eval_zero)
  expected = (~INVALID)[:, None, :] & ~np.eye(L, dtype=bool)[None]
  np.testing.assert_array_equal(eval_mask[:, :, 2:], expected)
  # Keep rate of eligible keys is 1 - mask_ratio.
  tokens = np.full((64, 48), 7, np.int32)
  eligible = ~np.eye(48, dtype=bool)[None].repeat(64, 0)
  for ratio in (0.3, 0.7):
    mask = np.asarray(sample_mask(jax.random.key(2), tokens, 1, ratio))
    assert abs(mask[:, :, 1:][eligible].mean() - (1 - ratio)) < 0.01


@pytest.mark.parametrize("query_mode,num_slots", [("streams", 1), ("streams", 2), ("sum", 2)])
def test_row_never_depends_on_its_own_token_nor_padding(query_mode, num_slots):
  module, params, apply = _model(num_slots, query_mode=query_mode)
  id_embs, doc_embs, _ = _embs(num_slots, seed=1)
  weights = np.arange(1, D + 1, dtype=np.float32)

  # One scalar per row and its exact gradient w.r.t. every token embedding. (Not one big
  # jit(jacrev): this jaxlib's CPU YNNPACK fusion miscomputes some large batched reductions.)
  @jax.jit
  @jax.grad
  def row_grad(doc_embs, i, mask):
    hidden = module.apply({"params": params}, id_embs, TOKENS, doc_embs, mask,
                          enable_dropout=False)
    return jnp.sum(jnp.take(hidden, i, axis=1) * weights[None])

  # Even a mask that allows everything cannot let a row see itself, padding or EOS.
  all_true = np.ones((B, L, num_slots + L), bool)
  sampled = sample_mask(jax.random.key(3), TOKENS, num_slots, 0.3)
  evaluation = rc.sample_reconstruction_mask(None, TOKENS, num_slots, 0.0)
  for mask in (all_true, sampled, evaluation):
    for i in range(L):
      grad = np.asarray(row_grad(doc_embs, i, mask))  # [B, L, D]
      assert np.all(grad[:, i] == 0.0), f"row {i} sees its own token"
      assert np.all(grad[INVALID] == 0.0), "padding/EOS attended"
  # Row 0 of doc 0 sees its 5 other real tokens under the evaluation mask (= mask None).
  assert np.all(np.abs(np.asarray(row_grad(doc_embs, 0, evaluation))[0, 1:6]).sum(-1) > 0)
  np.testing.assert_allclose(apply(id_embs, doc_embs), apply(id_embs, doc_embs, evaluation),
                             rtol=1e-6, atol=1e-6)


def test_id_slots_always_visible_and_output_shape():
  _, _, apply = _model(2)
  id_embs, doc_embs, _ = _embs(2, seed=2)
  # mask_ratio 1: every document key hidden; the rows still read the ID slots.
  mask = sample_mask(jax.random.key(0), TOKENS, 2, 1.0)
  assert not np.asarray(mask)[:, :, 2:].any()
  hidden = apply(id_embs, doc_embs, mask)
  assert hidden.shape == (B, L, D) and np.isfinite(hidden).all()
  g_ids, g_doc = jax.jit(jax.grad(lambda a, b: jnp.sum(apply(a, b, mask) ** 2), (0, 1)))(
      id_embs, doc_embs)
  assert np.all(np.abs(np.asarray(g_ids)).sum(-1) > 0)
  assert np.all(np.asarray(g_doc) == 0.0)
  # The hidden states score with the T5 LM head.
  model = t5.Transformer(T5_CONFIG)
  emb = np.random.default_rng(0).normal(size=(T5_CONFIG.vocab_size, D)).astype(np.float32)
  logits = model.apply({"params": {"token_embedder": {"embedding": emb}}}, hidden,
                       method=model.logits_from_hidden)
  assert logits.shape == (B, L, T5_CONFIG.vocab_size)


def test_leak_continuous_query_switch():
  id_embs, doc_embs, h = _embs(2, seed=3)
  h2 = h + 1.0

  def run(num_slots, **overrides):
    _, _, apply = _model(num_slots, **overrides)
    return [np.asarray(apply(id_embs[:, :num_slots], doc_embs, None, x)) for x in (h, h2)]

  clean = run(2)
  np.testing.assert_array_equal(clean[0], clean[1])  # continuous h is not read
  leaky = run(2, leak_continuous_query=True)
  assert np.abs(leaky[0] - leaky[1]).max() > 1e-3  # the continuous h reaches the output
  # Reference at t = 1: the (only) query is the quantized slot; the switch changes nothing.
  first = run(1, leak_continuous_query=True)
  np.testing.assert_array_equal(first[0], first[1])
  np.testing.assert_allclose(first[0], run(1)[0], rtol=1e-5, atol=1e-6)
  # One slot: 'sum' and 'streams' are the same computation (same parameters).
  module, params, _ = _model(1)
  summed = rc.Reconstructor(rc.ReconstructorConfig(query_mode="sum"), T5_CONFIG)
  np.testing.assert_allclose(
      summed.apply({"params": params}, id_embs[:, :1], TOKENS, doc_embs, enable_dropout=False),
      run(1)[0], rtol=1e-5, atol=1e-6)


def test_config_defaults_come_from_t5_and_layers_stack():
  module = rc.Reconstructor(rc.ReconstructorConfig(num_layers=2, num_heads=4, mlp_dim=8),
                            T5_CONFIG)
  block = module.block_config()
  assert (block.num_heads, block.head_dim, block.mlp_dim, block.emb_dim) == (4, 8, 8, D)
  params = _abstract_params(module, 1)
  assert set(params) == {"relpos_bias", "layers_0", "layers_1", "final_norm"}
  assert params["layers_0"]["mlp"]["wi"]["kernel"].names == ("embed", "mlp")
  assert params["layers_1"]["kv_layer_norm"]["scale"].names == ("embed",)
  assert params["relpos_bias"]["rel_embedding"].value.shape == (4, 32)
