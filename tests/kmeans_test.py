"""k-means: sklearn parity, a monotone objective, empty-cluster re-seeding, determinism, meshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import cluster
from sklearn import datasets

from lmindexer_jax import kmeans
from lmindexer_jax import partitioning

# One shape for the sklearn, history and determinism tests, so they share one compile.
_N, _D, _K, _R, _ITERS = 2000, 16, 20, 3, 100


@functools.cache
def _data(name: str) -> np.ndarray:
  if name == "blobs":
    x_NxD, _ = datasets.make_blobs(_N, _D, centers=_K, cluster_std=2.0, random_state=0)
  else:
    x_NxD = np.random.default_rng(0).normal(size=(_N, _D))
  return x_NxD.astype(np.float32)


@functools.cache
def _fit(name: str, seed: int = 0) -> kmeans.KMeansResult:
  return kmeans.kmeans(
      _data(name), _K, rng=jax.random.PRNGKey(seed), num_iters=_ITERS, num_restarts=_R
  )


def _small_blobs(n: int = 203) -> np.ndarray:
  x_NxD, _ = datasets.make_blobs(n, 8, centers=5, cluster_std=1.5, random_state=1)
  return x_NxD.astype(np.float32)


@pytest.mark.parametrize("name", ["blobs", "gaussian"])
def test_matches_sklearn_inertia(name):
  x_NxD = _data(name)
  ours = _fit(name)
  theirs = cluster.KMeans(n_clusters=_K, n_init=_R, random_state=0).fit(x_NxD)
  assert float(ours.inertia) <= 1.01 * theirs.inertia_, (float(ours.inertia), theirs.inertia_)
  # The result is self-consistent: assignments and inertia belong to the returned centres.
  a_N, d2_N = kmeans.assign(x_NxD, ours.centers_KxD)
  np.testing.assert_array_equal(a_N, ours.assignments_N)
  np.testing.assert_allclose(float(jnp.sum(d2_N)), float(ours.inertia), rtol=1e-5)
  np.testing.assert_allclose(
      float(kmeans.inertia(x_NxD, ours.centers_KxD)), float(ours.inertia), rtol=1e-5
  )
  assert np.all(np.bincount(np.asarray(ours.assignments_N), minlength=_K) > 0)


@pytest.mark.parametrize("name", ["blobs", "gaussian"])
def test_objective_never_increases(name):
  result = _fit(name)
  t = int(result.num_iters_run)
  assert 1 < t < _ITERS  # Converged on tol, not the iteration cap.
  hist_I = np.asarray(result.inertia_history_I)
  assert np.all(np.isfinite(hist_I[:t])) and np.all(np.isnan(hist_I[t:]))
  assert np.all(np.diff(hist_I[:t]) <= 1e-6 * hist_I[: t - 1])
  assert float(result.inertia) <= hist_I[t - 1] * (1 + 1e-6)


def test_deterministic_and_best_restart_chosen():
  a, b = _fit("gaussian", 0), kmeans.kmeans(
      _data("gaussian"), _K, rng=jax.random.PRNGKey(0), num_iters=_ITERS, num_restarts=_R
  )
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(leaf_a, leaf_b)
  # Restarts land in different local optima; the lowest is returned.
  inertias_R = np.asarray(a.restart_inertias_R)
  assert len(set(inertias_R.tolist())) > 1
  assert float(a.inertia) == inertias_R.min()
  other = _fit("gaussian", 1)
  assert not np.array_equal(np.asarray(other.restart_inertias_R), inertias_R)


def test_empty_clusters_are_reseeded():
  # 50 duplicates at the origin, then 7 distinct far points (one with 5 copies, one with 3);
  # every initial centre sits on the origin, so the first assignment leaves 7 clusters empty.
  far_7xD = 10.0 * np.eye(7, 4, dtype=np.float32) + np.arange(7, dtype=np.float32)[:, None]
  x_NxD = np.concatenate(
      [np.zeros((50, 4), np.float32), np.repeat(far_7xD, [5, 3, 1, 1, 1, 1, 1], axis=0)]
  )
  result = kmeans.kmeans(
      x_NxD, 8, rng=jax.random.PRNGKey(0), init=np.zeros((8, 4), np.float32), num_iters=_ITERS
  )
  counts_K = np.bincount(np.asarray(result.assignments_N), minlength=8)
  assert np.all(counts_K > 0), counts_K
  assert sorted(counts_K.tolist()) == [1, 1, 1, 1, 1, 3, 5, 50]
  assert float(result.inertia) < 1e-3


def test_fewer_distinct_points_than_clusters_stops():
  x_NxD = np.repeat(np.eye(3, 4, dtype=np.float32), 10, axis=0)
  result = kmeans.kmeans(x_NxD, 5, rng=jax.random.PRNGKey(0), num_iters=_ITERS)
  assert len(set(np.asarray(result.assignments_N).tolist())) == 3
  assert int(result.num_iters_run) < _ITERS
  assert float(result.inertia) < 1e-5


def _mesh_run(partitioner, x_NxD, chunk_size=None):
  return kmeans.kmeans(
      x_NxD,
      5,
      rng=jax.random.PRNGKey(3),
      num_iters=_ITERS,
      num_restarts=2,
      partitioner=partitioner,
      chunk_size=chunk_size,
  )


@pytest.mark.parametrize(
    "num_partitions,chunk_size", [(1, None), (2, None), (2, 8)], ids=["dp8", "dp4mp2", "chunks"]
)
def test_sharded_matches_single_device(num_partitions, chunk_size):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  x_NxD = _small_blobs()  # N = 203: not divisible by 8 or 4, so the mesh pads.
  single = _mesh_run(partitioning.Partitioner(num_devices=1), x_NxD)
  sharded = _mesh_run(
      partitioning.Partitioner(num_partitions=num_partitions), jnp.asarray(x_NxD), chunk_size
  )
  assert sharded.assignments_N.shape == (203,)
  np.testing.assert_array_equal(sharded.assignments_N, single.assignments_N)
  np.testing.assert_allclose(float(sharded.inertia), float(single.inertia), rtol=1e-5)
  np.testing.assert_allclose(sharded.centers_KxD, single.centers_KxD, rtol=1e-5, atol=1e-5)


def test_chunk_padding_does_not_change_result():
  x_NxD = _small_blobs()
  whole = _mesh_run(None, x_NxD)  # One chunk of 203.
  chunked = _mesh_run(None, x_NxD, chunk_size=10)  # 21 chunks of 10: 7 padding points.
  np.testing.assert_array_equal(chunked.assignments_N, whole.assignments_N)
  np.testing.assert_allclose(float(chunked.inertia), float(whole.inertia), rtol=1e-5)
  assert int(chunked.num_iters_run) == int(whole.num_iters_run)


def test_pad_to_does_not_change_result():
  """Rows padded up to `pad_to` (for one compile across sizes) do not count."""
  x_NxD = _small_blobs()
  whole = kmeans.kmeans(x_NxD, 5, rng=jax.random.PRNGKey(0), num_iters=50)
  padded = kmeans.kmeans(x_NxD, 5, rng=jax.random.PRNGKey(0), num_iters=50, pad_to=256)
  np.testing.assert_array_equal(padded.assignments_N, whole.assignments_N)
  assert padded.assignments_N.shape == (203,)
  np.testing.assert_allclose(float(padded.inertia), float(whole.inertia), rtol=1e-5)
  assert [kmeans.size_bucket(n) for n in (1, 2, 3, 4, 5, 203, 256, 257)] == [
      1, 2, 4, 4, 8, 256, 256, 512]


def test_assign_matches_brute_force():
  x_NxD = _small_blobs()
  c_KxD = x_NxD[:6] + 0.5
  a_N, d2_N = kmeans.assign(x_NxD, c_KxD, chunk_size=16)
  dist_NxK = np.sum((x_NxD[:, None, :] - c_KxD[None, :, :]) ** 2, axis=-1)
  np.testing.assert_array_equal(a_N, dist_NxK.argmin(1))
  np.testing.assert_allclose(d2_N, dist_NxK.min(1), rtol=1e-4, atol=1e-3)


def test_cosine_is_spherical_kmeans():
  x_NxD = _small_blobs()
  result = kmeans.kmeans(x_NxD, 5, rng=jax.random.PRNGKey(0), distance="cosine")
  c_KxD = np.asarray(result.centers_KxD)
  np.testing.assert_allclose(np.linalg.norm(c_KxD, axis=1), 1.0, rtol=1e-5)
  unit_NxD = x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)
  np.testing.assert_array_equal(result.assignments_N, (unit_NxD @ c_KxD.T).argmax(1))
  cos_N = np.max(unit_NxD @ c_KxD.T, axis=1)
  np.testing.assert_allclose(float(result.inertia), np.sum(2 - 2 * cos_N), rtol=1e-4)


def test_random_init_is_deterministic_and_converges():
  x_NxD = _small_blobs()
  run = functools.partial(kmeans.kmeans, x_NxD, 5, rng=jax.random.PRNGKey(0), init="random")
  a, b = run(), run()
  np.testing.assert_array_equal(a.centers_KxD, b.centers_KxD)
  hist_I = np.asarray(a.inertia_history_I)[: int(a.num_iters_run)]
  assert np.all(np.diff(hist_I) <= 1e-6 * hist_I[:-1])
  assert np.all(np.bincount(np.asarray(a.assignments_N), minlength=5) > 0)


def test_rejects_bad_arguments():
  x_NxD = np.zeros((4, 2), np.float32)
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_clusters"):
    kmeans.kmeans(x_NxD, 5, rng=rng)
  with pytest.raises(ValueError, match="distance"):
    kmeans.kmeans(x_NxD, 2, rng=rng, distance="l1")
  with pytest.raises(ValueError, match="num_restarts == 1"):
    kmeans.kmeans(x_NxD, 2, rng=rng, init=np.zeros((2, 2)), num_restarts=2)
  with pytest.raises(ValueError, match="shape"):
    kmeans.assign(x_NxD, np.zeros((3, 5)))
