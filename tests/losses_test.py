"""Behaviour of the loss terms: hand computations, masking, and what each term may see."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmindexer_jax import losses
from lmindexer_jax.vocabularies import IdLayout

jax.config.update("jax_numpy_rank_promotion", "raise")


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_reconstruction_loss_is_the_weighted_token_mean():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 3, 4)).astype(np.float32)
  head = rng.normal(size=(4, 5)).astype(np.float32)
  logits = hidden @ head
  tokens = np.array([[1, 2, 3], [4, 0, 0]])
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  loss, metrics = losses.reconstruction_loss(hidden, head, tokens, weights)
  nll = -np.take_along_axis(_log_softmax(logits), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, (nll * weights).sum() / 3, rtol=1e-5)
  correct = (logits.argmax(-1) == tokens) * weights
  np.testing.assert_allclose(metrics["reconstruction_accuracy"], correct.sum() / 3, rtol=1e-6)
  assert float(metrics["reconstruction_tokens"]) == 3


@pytest.mark.parametrize("max_chunk_logits", [1, 3 * 7 * 11, 10**9])  # 1, 3 of 7, all columns
def test_chunked_cross_entropy_equals_the_full_one_with_gradients(max_chunk_logits):
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, size=(3, 7)))
  weights = jnp.asarray(rng.random((3, 7)) > 0.3, jnp.float32)

  def chunked(h, w):
    return losses.chunked_token_cross_entropy(h, w, tokens, weights,
                                              max_chunk_logits=max_chunk_logits)

  def full(h, w):
    return losses.token_cross_entropy(h @ w, tokens, weights)

  for got, want in zip(jax.jit(chunked)(hidden, head), full(hidden, head), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  got = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(hidden, head)
  want = jax.grad(lambda h, w: full(h, w)[0], argnums=(0, 1))(hidden, head)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_token_accuracy_counts_a_target_tied_at_the_top():
  # Rows: the target alone on top, tied on top with another token, below the top.
  logits = jnp.array([[[3.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 1.0, 5.0]]])
  tokens = jnp.array([[0, 1, 1]])
  weights = jnp.ones((1, 3))
  assert float(losses.token_cross_entropy(logits, tokens, weights)[1]) == pytest.approx(2 / 3)
  # The chunked form, with the logits as hidden states under an identity head.
  chunked = losses.chunked_token_cross_entropy(logits, jnp.eye(3), tokens, weights,
                                               max_chunk_logits=3)
  assert float(chunked[1]) == pytest.approx(2 / 3)


def test_in_batch_contrastive_equals_hand_computation():
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(2, 4, 3)).astype(np.float32)
  loss, metrics = losses.in_batch_contrastive_loss(q, k)
  expected = -np.mean(np.diag(_log_softmax(q @ k.T)))  # reference: raw dot products
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive_accuracy"],
                             np.mean((q @ k.T).argmax(-1) == np.arange(4)))
  # Temperature and cosine scores.
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
  loss, _ = losses.in_batch_contrastive_loss(q, k, temperature=0.1, normalize=True)
  np.testing.assert_allclose(loss, -np.mean(np.diag(_log_softmax(qn @ kn.T / 0.1))), rtol=1e-5)
  # A zero-weight row (batch padding) is neither a query nor a negative.
  loss, _ = losses.in_batch_contrastive_loss(q, k, weights_B=np.array([1, 1, 1, 0]))
  np.testing.assert_allclose(
      loss, -np.mean(np.diag(_log_softmax(q[:3] @ k[:3].T))), rtol=1e-5)


def test_in_batch_contrastive_groups_compete_within_their_group():
  """With groups (the ID prefixes at position > 1), a row's negatives are the other rows with
  the same whole prefix, and a row alone in its group is left out."""
  rng = np.random.default_rng(3)
  q, k = rng.normal(size=(2, 5, 3)).astype(np.float32)
  prefixes = np.array([[1, 7], [1, 7], [0, 2], [0, 2], [1, 2]])  # row 4 shares only code 1
  loss, metrics = losses.in_batch_contrastive_loss(q, k, groups_BxP=prefixes)
  expected = [-_log_softmax(q[i] @ k[members].T)[list(members).index(i)]
              for members in ([0, 1], [2, 3]) for i in members]
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  scores = q @ k.T
  correct = [scores[0, 0] > scores[0, 1], scores[1, 1] > scores[1, 0],
             scores[2, 2] > scores[2, 3], scores[3, 3] > scores[3, 2]]
  np.testing.assert_allclose(metrics["contrastive_accuracy"], np.mean(correct))
  np.testing.assert_allclose(metrics["contrastive_rows_used"], 4 / 5)
  # One int per row is the same grouping.
  flat, _ = losses.in_batch_contrastive_loss(q, k, groups_BxP=np.array([5, 5, 3, 3, 4]))
  np.testing.assert_allclose(flat, loss, rtol=1e-6)
  # The sibling-less row's vectors change nothing, nor does anything outside a row's group.
  q2, k2 = q.copy(), k.copy()
  q2[4] += 5.0
  k2[4] -= 5.0
  moved, _ = losses.in_batch_contrastive_loss(q2, k2, groups_BxP=prefixes)
  np.testing.assert_allclose(moved, loss, rtol=1e-6)
  k3 = k.copy()
  k3[2:4] += 3.0
  moved, _ = losses.in_batch_contrastive_loss(q, k3, groups_BxP=prefixes)
  np.testing.assert_allclose(moved, np.mean(
      [-_log_softmax(q[i] @ k3[members].T)[list(members).index(i)]
       for members in ([0, 1], [2, 3]) for i in members]), rtol=1e-5)
  # Nothing usable at all: loss 0, not NaN.
  empty, metrics = losses.in_batch_contrastive_loss(q, k, groups_BxP=np.arange(5))
  assert float(empty) == 0.0 and float(metrics["contrastive_rows_used"]) == 0.0


LAYOUT = IdLayout(base_size=10, codebook_sizes=(4, 3, 5))  # slices [10,14) [14,17) [17,22)


def _peaked_logits(codes, peak=50.0, background=0.0):
  """Decoder logits [B, T=3, V] with all mass on each position's assigned code."""
  logits = np.full((len(codes), 3, LAYOUT.vocab_size), background, np.float32)
  for b, row in enumerate(codes):
    for p, code in enumerate(row):
      logits[b, p, LAYOUT.token_id(p, code)] = peak
  return logits


def test_commitment_loss_zero_on_the_assigned_codes_large_otherwise():
  codes = np.array([[1, 2], [3, 0]])
  logits = _peaked_logits(codes)
  loss, metrics = losses.commitment_loss(logits, codes, LAYOUT)
  assert float(loss) < 1e-6 and float(metrics["commitment_accuracy"]) == 1.0
  wrong = np.array([[0, 1], [2, 2]])
  loss, metrics = losses.commitment_loss(logits, wrong, LAYOUT)
  assert float(loss) > 40.0 and float(metrics["commitment_accuracy"]) == 0.0
  # Position ranges instead of a layout give the same.
  ranges = [LAYOUT.position_range(p) for p in range(2)]
  np.testing.assert_allclose(losses.commitment_loss(logits, wrong, ranges)[0], loss)


def test_commitment_loss_ignores_logits_outside_each_positions_slice():
  codes = np.array([[1, 2], [3, 0]])
  logits = _peaked_logits(codes)
  noisy = logits.copy()
  noisy[:, :, :10] = 100.0  # text tokens
  noisy[:, 0, 14:] = 100.0  # other positions' IDs at decoder position 0
  noisy[:, 1, 10:14] = 100.0
  noisy[:, 1, 17:] = 100.0
  noisy[:, 2, :] = np.random.default_rng(0).normal(size=noisy[:, 2].shape)  # current position
  loss, _ = losses.commitment_loss(noisy, codes, LAYOUT)
  assert float(loss) < 1e-6
  # Hand value of a uniform slice: log(slice size), averaged over the two positions.
  flat = np.zeros_like(logits)
  loss, _ = losses.commitment_loss(flat, codes, LAYOUT)
  np.testing.assert_allclose(loss, (np.log(4) + np.log(3)) / 2, rtol=1e-6)


def test_commitment_loss_is_zero_at_the_first_position():
  loss, metrics = losses.commitment_loss(np.ones((2, 1, 22), np.float32),
                                         np.zeros((2, 0), np.int32), LAYOUT)
  assert float(loss) == 0.0 and float(metrics["commitment_loss"]) == 0.0


def test_code_commitment_loss_hand_value_and_its_pull_towards_the_chosen_codeword():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
  codes = jnp.argmax(logits, axis=-1)
  loss, metrics = losses.code_commitment_loss(logits, codes)
  row0 = np.log(1 + np.exp(-1) + np.exp(-2))  # -log softmax(2 | 2, 1, 0)
  row1 = np.log(1 + 2 * np.exp(-5))
  np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["code_confidence"], (np.exp(-row0) + np.exp(-row1)) / 2,
                             rtol=1e-6)
  # Through h.E, a step against the gradient moves h towards E[code] and widens its margin,
  # most for the row nearest a boundary.
  codebook_KxD = jnp.eye(3)
  h_BxD = jnp.array([[1.0, 0.9, 0.0], [0.0, 0.0, 6.0]])
  codes_B = jnp.argmax(h_BxD @ codebook_KxD.T, axis=-1)
  grad_BxD = jax.grad(lambda h: losses.code_commitment_loss(h @ codebook_KxD.T, codes_B)[0])(
      h_BxD)
  stepped_BxD = h_BxD - grad_BxD

  def margin(h):
    logits = h @ codebook_KxD.T
    return logits[jnp.arange(2), codes_B] - jnp.sort(logits, axis=-1)[:, -2]

  gain_B = margin(stepped_BxD) - margin(h_BxD)
  assert np.all(gain_B > 0) and gain_B[0] > 10 * gain_B[1]
  np.testing.assert_array_equal(jnp.argmax(stepped_BxD, axis=-1), codes_B)
