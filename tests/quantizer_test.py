"""Behaviour of the quantizers: straight-through gradients, Gumbel noise, EMA updates, usage."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmindexer_jax import quantizer as qz

jax.config.update("jax_numpy_rank_promotion", "raise")

B, D, K = 6, 4, 5


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, D)).astype(np.float32),
          rng.normal(size=(K, D)).astype(np.float32))


def test_codes_are_argmax_and_forward_value_is_the_hard_codeword():
  h, e = _inputs()
  out = qz.straight_through_quantize(h, e)
  logits = h @ e.T
  np.testing.assert_allclose(out.logits_BxK, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.codes_B, np.argmax(logits, axis=-1))
  np.testing.assert_allclose(out.quantized_BxD, e[np.argmax(logits, axis=-1)], atol=1e-6)
  assert float(out.vq_commitment_loss) == 0.0
  # Cosine logits are bounded by 1.
  out = qz.straight_through_quantize(h, e, normalize=True)
  assert np.all(np.abs(out.logits_BxK) <= 1.0 + 1e-5)


def test_straight_through_gradient_is_the_soft_gradient():
  h, e = _inputs()
  w = np.random.default_rng(1).normal(size=(B, D)).astype(np.float32)

  def through(h, e, field):
    out = qz.straight_through_quantize(h, e, temperature=0.7)
    return jnp.sum(getattr(out, field) * w)

  for argnum in (0, 1):  # encoder side and codebook side
    g_q = jax.grad(through, argnum)(h, e, "quantized_BxD")
    g_s = jax.grad(through, argnum)(h, e, "soft_BxD")
    np.testing.assert_allclose(g_q, g_s, rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(np.asarray(g_q)).sum(axis=-1) > 0), "every row gets a gradient"


def test_gumbel_noise_only_with_an_rng():
  h, e = _inputs()
  clean = qz.straight_through_quantize(h, e, gumbel_scale=100.0)
  np.testing.assert_array_equal(clean.codes_B, np.argmax(h @ e.T, axis=-1))
  changed = 0
  for seed in range(5):
    noisy = qz.straight_through_quantize(h, e, gumbel_rng=jax.random.key(seed), gumbel_scale=100.0)
    # Returned logits stay clean; the codes follow the noisy ones.
    np.testing.assert_allclose(noisy.logits_BxK, clean.logits_BxK, rtol=1e-6)
    np.testing.assert_allclose(noisy.quantized_BxD, e[np.asarray(noisy.codes_B)], atol=1e-6)
    changed += int(np.sum(np.asarray(noisy.codes_B) != np.asarray(clean.codes_B)))
  assert changed > 0
  tiny = qz.straight_through_quantize(h, e, gumbel_rng=jax.random.key(0), gumbel_scale=1e-6)
  np.testing.assert_array_equal(tiny.codes_B, clean.codes_B)


def test_straight_through_module_params_and_load_centers():
  cfg = qz.QuantizerConfig(codebook_size=K, emb_dim=D)
  module = qz.Quantizer(cfg)
  h, e = _inputs()
  variables = module.init(jax.random.key(0), h)
  boxed = variables["params"]["codebook"]
  assert isinstance(boxed, nn.LogicallyPartitioned)
  assert boxed.names == ("codebook", "embed")
  variables = qz.load_centers(variables, e)
  assert variables["params"]["codebook"].names == ("codebook", "embed")
  np.testing.assert_array_equal(qz.codebook_of(variables), e)
  out = module.apply(variables, h)
  np.testing.assert_array_equal(out.codes_B, np.argmax(h @ e.T, axis=-1))
  with pytest.raises(ValueError, match="shape"):
    qz.load_centers(variables, e[:-1])
  # Nested under a parent module.
  nested = {"params": {"quantizer": variables["params"]}}
  zeros = np.zeros((K, D), np.float32)
  np.testing.assert_array_equal(
      qz.codebook_of(qz.load_centers(nested, zeros, path=("quantizer",)), ("quantizer",)), zeros)


def _ema_module(decay=0.5):
  cfg = qz.QuantizerConfig(codebook_size=3, emb_dim=2, kind=qz.EMA_VQ, ema_decay=decay)
  module = qz.Quantizer(cfg)
  centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
  h = np.zeros((4, 2), np.float32)
  variables = qz.load_centers(module.init(jax.random.key(0), h), centers)
  return module, variables, centers


def test_ema_codebook_lives_outside_params_and_moves_to_assigned_means():
  module, variables, centers = _ema_module()
  assert "params" not in variables
  assert variables[qz.EMA_COLLECTION]["codebook"].names == ("codebook", "embed")
  # Two rows near code 0, two near code 1, none near code 2.
  h = np.array([[1.0, 1.0], [1.0, -1.0], [9.0, 2.0], [11.0, 2.0]], np.float32)
  out, updates = module.apply(variables, h, update_ema=True, mutable=[qz.EMA_COLLECTION])
  np.testing.assert_array_equal(out.codes_B, [0, 0, 1, 1])
  np.testing.assert_allclose(out.logits_BxK, -((h[:, None] - centers[None]) ** 2).sum(-1),
                             rtol=1e-5)
  new = np.asarray(nn.unbox(updates[qz.EMA_COLLECTION]["codebook"]))
  means = np.array([[1.0, 0.0], [10.0, 2.0]], np.float32)
  for k in (0, 1):
    assert np.linalg.norm(new[k] - means[k]) < np.linalg.norm(centers[k] - means[k])
  # decay 0.5 with a unit prior count: (0.5 * c + 0.5 * sum) / (0.5 + 0.5 * 2).
  np.testing.assert_allclose(new[1], (0.5 * centers[1] + 0.5 * h[2:].sum(0)) / 1.5, rtol=1e-4)
  np.testing.assert_array_equal(new[2], centers[2])  # unused: stays put
  # Straight-through identity gradient and the commitment term (weight 0.25).
  np.testing.assert_allclose(out.quantized_BxD, centers[[0, 0, 1, 1]])
  expected = 0.25 * np.mean((h - centers[[0, 0, 1, 1]]) ** 2)
  np.testing.assert_allclose(out.vq_commitment_loss, expected, rtol=1e-5)
  grad = jax.grad(lambda h: jnp.sum(module.apply(variables, h).quantized_BxD))(h)
  np.testing.assert_allclose(grad, np.ones_like(h))


def test_ema_without_update_leaves_the_codebook_alone():
  module, variables, centers = _ema_module()
  h = np.ones((4, 2), np.float32)
  _, updates = module.apply(variables, h, mutable=[qz.EMA_COLLECTION])
  np.testing.assert_array_equal(nn.unbox(updates[qz.EMA_COLLECTION]["codebook"]), centers)
  with pytest.raises(ValueError, match="mutable"):
    module.apply(variables, h, update_ema=True)
  # Zero-weight rows (batch padding) count for nothing.
  _, updates = module.apply(variables, h, update_ema=True, weights_B=np.zeros(4),
                            mutable=[qz.EMA_COLLECTION])
  np.testing.assert_array_equal(nn.unbox(updates[qz.EMA_COLLECTION]["codebook"]), centers)


def test_ema_long_unused_codeword_does_not_decay():
  module, variables, centers = _ema_module(decay=0.5)
  h = np.array([[1.0, 1.0], [9.0, 2.0]], np.float32)  # codes 0 and 1 only

  @jax.jit
  def steps(variables):
    def body(_, ema):
      _, updates = module.apply(ema, h, update_ema=True, mutable=[qz.EMA_COLLECTION])
      return updates
    return jax.lax.fori_loop(0, 60, body, variables)

  # 0.5**60: code 2's decayed count is far below epsilon, its codeword still exact.
  codebook = np.asarray(qz.codebook_of(steps(variables)))
  np.testing.assert_array_equal(codebook[2], centers[2])
  np.testing.assert_allclose(codebook[:2], h, rtol=1e-5)


def test_codebook_usage_on_a_known_assignment():
  stats = qz.codebook_usage(jnp.array([0, 0, 1, 2]), 4)
  assert float(stats["codes_used"]) == 3
  np.testing.assert_allclose(stats["unused_ratio"], 0.25)
  np.testing.assert_allclose(stats["max_ratio"], 0.5)
  np.testing.assert_allclose(stats["usage_perplexity"], 2**1.5, rtol=1e-6)  # exp(1.5 ln 2)
  stats = qz.codebook_usage(jnp.array([3, 3, 1]), 4, weights_N=jnp.array([1.0, 1.0, 0.0]))
  assert float(stats["codes_used"]) == 1
  np.testing.assert_allclose(stats["usage_perplexity"], 1.0)
  np.testing.assert_allclose(stats["max_ratio"], 1.0)


@pytest.mark.parametrize("normalize", [False, True])
def test_fit_codebook_reproduces_codes_chosen_elsewhere(normalize):
  """Codes given by a linear rule that is not the codebook's own (e.g. clusters of another view
  of h): the fitted codebook's argmax gives them, at h's mean norm."""
  rng = np.random.default_rng(0)
  h_NxD = (3.0 * rng.normal(size=(500, 8))).astype(np.float32)
  rule_DxK = rng.normal(size=(8, 5))
  rule_DxK /= np.linalg.norm(rule_DxK, axis=0)  # equal norms: a cosine codebook can express it
  codes_N = np.argmax(h_NxD @ rule_DxK, axis=1)
  codebook_KxD = qz.fit_codebook(h_NxD, codes_N, 5, normalize=normalize, steps=1000)
  fitted_N = np.asarray(qz.straight_through_quantize(
      h_NxD, codebook_KxD, normalize=normalize).codes_B)
  assert np.mean(fitted_N == codes_N) > 0.97
  np.testing.assert_allclose(np.linalg.norm(codebook_KxD, axis=1).mean(),
                             np.linalg.norm(h_NxD, axis=1).mean(), rtol=1e-5)
