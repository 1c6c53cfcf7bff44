"""k-means in JAX: greedy k-means++ seeding and Lloyd iterations, sharded over the `data` axis.

Initialises LMIndexer's codebooks from document representations (the reference runs faiss
k-means with niter 3000, nredo 10 on every document rep, reference §2.6) and backs the
hierarchical and residual k-means ID baselines.

The points are split over the mesh axes that the logical axis `batch` maps to; the centres are
replicated. Under `jit` with `NamedSharding`s the plain sums below are already global, so there is
no pmap-style `psum`.

Memory: the padded points and a centred (l2) or normalised (cosine) copy (2 x N x D floats), one
B x K distance block per chunk, N x L floats during k-means++; never N x K, nor N x K x D.
Cost: k-means++ is O(N K L D) flops with L = 2 + floor(ln K) local trials (sklearn's greedy
variant); each Lloyd iteration is O(N K D) flops (one distance matmul, one one-hot matmul for the
centre sums); restarts run one after another, so time scales with R and memory does not.

Legend: N points, D feature dims, K clusters, R restarts, I Lloyd iterations, L k-means++ local
trials, B points per chunk (all devices together), S chunks (padded N = B * S).
"""

import dataclasses
import math
from typing import Literal

from flax import struct
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from lmindexer_jax import partitioning

Distance = Literal["l2", "cosine"]
Init = Literal["k-means++", "random"]

# f32 matmuls: TPUs (bf16 passes) and GPUs (TF32) would otherwise round the distances, which
# flips near-tie assignments, and the one-hot matmul, which must return exact centre sums.
_PRECISION = lax.Precision.HIGHEST
# Default chunk: at most this many B x K distance entries per device (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


@struct.dataclass
class KMeansResult:
  """The best of `num_restarts` k-means runs (lowest inertia).

  Attributes:
    centers_KxD: float32 [K, D] centres (unit norm for `distance='cosine'`).
    assignments_N: int32 [N] index of each point's nearest centre.
    inertia: float32 [] sum over points of the squared distance to the assigned centre.
    num_iters_run: int32 [] Lloyd iterations the best restart ran.
    inertia_history_I: float32 [num_iters] inertia of the assignment step of each iteration of
      the best restart (w.r.t. that iteration's centres, before their update); NaN after the stop.
      Non-increasing up to float rounding. `inertia` is that of the final centres.
    restart_inertias_R: float32 [R] final inertia of every restart, in rng-split order.
  """

  centers_KxD: jax.Array
  assignments_N: jax.Array
  inertia: jax.Array
  num_iters_run: jax.Array
  inertia_history_I: jax.Array
  restart_inertias_R: jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the compiled run depends on besides shapes: kept few so compiles are reused."""

  num_clusters: int
  num_iters: int
  init: str  # "k-means++", "random" or "given".
  distance: str
  num_chunks: int  # S
  sharding: NamedSharding | None  # Of an [N] array: how the points are split.


# ------------------------------------------------------------------------------------------------
# Sharding helpers.
# ------------------------------------------------------------------------------------------------


def _points_sharding(
    partitioner: partitioning.Partitioner | None,
) -> tuple[NamedSharding | None, int]:
  """(sharding of an [N] array over the `batch` axis, number of shards of N)."""
  if partitioner is None:
    return None, 1
  sharding = partitioner.sharding(P("batch"))
  return sharding, _num_shards(sharding)


def _num_shards(sharding: NamedSharding | None) -> int:
  """How many contiguous blocks `sharding` splits an [N] array into."""
  axes = sharding.spec[0] if sharding is not None and sharding.spec else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(sharding.mesh.shape[a] for a in axes)


def _leading(sharding: NamedSharding | None, ndim: int) -> NamedSharding | None:
  """`sharding` of an [N] array extended to an [N, ...] array of rank `ndim`."""
  if sharding is None:
    return None
  lead = sharding.spec[0] if sharding.spec else None
  return NamedSharding(sharding.mesh, P(lead, *([None] * (ndim - 1))))


def _constrain(a: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  """Splits `a` along its leading axis like the points (no-op without a partitioner)."""
  if sharding is None:
    return a
  return lax.with_sharding_constraint(a, _leading(sharding, a.ndim))


def _layout(n: int, num_shards: int, chunk_size: int | None, k: int) -> tuple[int, int]:
  """(B, S): chunks of B points (B divisible by `num_shards`), S chunks, B * S >= n."""
  rows = chunk_size or max(1, _CHUNK_ELEMENTS // k)  # Per device per chunk.
  local_n = -(-n // num_shards)
  s = -(-local_n // rows)
  b_local = -(-local_n // s)  # Balanced chunks: padding stays below S per device.
  return b_local * num_shards, s


def _place(x_NxD, n_pad: int, sharding: NamedSharding | None) -> jax.Array:
  """float32 points padded with zero rows to `n_pad`, split over the mesh."""
  n = x_NxD.shape[0]
  if isinstance(x_NxD, jax.Array):

    def pad(x_NxD):
      return jnp.pad(x_NxD.astype(jnp.float32), ((0, n_pad - n), (0, 0)))

    return jax.jit(pad, out_shardings=sharding)(x_NxD)
  x_NxD = np.pad(np.asarray(x_NxD, np.float32), ((0, n_pad - n), (0, 0)))
  return jax.device_put(x_NxD, sharding) if sharding is not None else jnp.asarray(x_NxD)


# ------------------------------------------------------------------------------------------------
# Pure math (inside jit).
# ------------------------------------------------------------------------------------------------


def _normalize(x_NxD: jax.Array) -> jax.Array:
  norm_N = jnp.linalg.norm(x_NxD, axis=-1, keepdims=True)
  return x_NxD / jnp.maximum(norm_N, 1e-12)


def _sq_dists(x_NxD: jax.Array, xx_N: jax.Array, c_KxD: jax.Array) -> jax.Array:
  """Squared distances |x|^2 - 2 x.c + |c|^2, clamped at 0: [N, K]."""
  cc_K = jnp.sum(c_KxD * c_KxD, axis=-1)
  dot_NxK = jnp.einsum("nd,kd->nk", x_NxD, c_KxD, precision=_PRECISION)
  return jnp.maximum(xx_N[:, None] - 2.0 * dot_NxK + cc_K[None, :], 0.0)


def _rows(x_NxD: jax.Array, idx_L: jax.Array, st: _Static) -> jax.Array:
  """x_NxD[idx_L]. With split points, as a one-hot matmul: local to each shard plus one small
  all-reduce (a gather from the split axis may make XLA all-gather every point); exact, as one
  term per output is nonzero, so both paths agree bit for bit.
  """
  if _num_shards(st.sharding) == 1:
    return jnp.take(x_NxD, idx_L, axis=0)
  hit_LxN = jnp.arange(x_NxD.shape[0])[None, :] == idx_L[:, None]
  return jnp.einsum("ln,nd->ld", hit_LxN.astype(x_NxD.dtype), x_NxD, precision=_PRECISION)


def _prepare(x_NxD: jax.Array, n: jax.Array, st: _Static):
  """(points, their squared norms, validity weights, translation) for the Lloyd passes.

  l2 distances are translation-invariant, so the points are centred on their mean: the
  |x|^2 - 2 x.c + |c|^2 expansion loses far fewer float32 digits near the origin.
  """
  n_pad = x_NxD.shape[0]
  w_N = _constrain((jnp.arange(n_pad) < n).astype(jnp.float32), st.sharding)
  x_NxD = _constrain(x_NxD, st.sharding)
  if st.distance == "cosine":
    shift_D = jnp.zeros(x_NxD.shape[1], jnp.float32)
    x_NxD = _normalize(x_NxD)
  else:
    shift_D = jnp.sum(x_NxD * w_N[:, None], axis=0) / n.astype(jnp.float32)
    x_NxD = (x_NxD - shift_D[None, :]) * w_N[:, None]  # Padding rows stay exactly 0.
  xx_N = jnp.sum(x_NxD * x_NxD, axis=-1)
  return x_NxD, xx_N, w_N, shift_D


def _lloyd_pass(x_NxD, xx_N, w_N, c_KxD, st: _Static, *, stats: bool, valid_K=None):
  """One pass over the chunks: nearest centres, and (if `stats`) the centre sums and counts.

  Returns:
    (sums_KxD, counts_K, inertia, assignments_N, sq_dist_N); sums and counts are None unless
    `stats`; padding points have weight 0 and sq_dist 0. `valid_K` False hides a centre.
  """
  n_pad, d = x_NxD.shape
  k = c_KxD.shape[0]
  s = st.num_chunks
  b = n_pad // s
  # Row n = b * S + s: the reshape keeps each device's rows on that device.
  x_BxSxD = _constrain(x_NxD.reshape(b, s, d), st.sharding)
  xx_BxS = _constrain(xx_N.reshape(b, s), st.sharding)
  w_BxS = _constrain(w_N.reshape(b, s), st.sharding)
  cc_K = jnp.sum(c_KxD * c_KxD, axis=-1)
  if valid_K is not None:
    cc_K = jnp.where(valid_K, cc_K, jnp.inf)

  def step(carry, i):
    sums_KxD, counts_K, inertia = carry
    x_BxD = lax.dynamic_index_in_dim(x_BxSxD, i, axis=1, keepdims=False)
    xx_B = lax.dynamic_index_in_dim(xx_BxS, i, axis=1, keepdims=False)
    w_B = lax.dynamic_index_in_dim(w_BxS, i, axis=1, keepdims=False)
    dot_BxK = jnp.einsum("bd,kd->bk", x_BxD, c_KxD, precision=_PRECISION)
    dist_BxK = jnp.maximum(xx_B[:, None] - 2.0 * dot_BxK + cc_K[None, :], 0.0)
    a_B = jnp.argmin(dist_BxK, axis=1).astype(jnp.int32)
    d2_B = jnp.min(dist_BxK, axis=1) * w_B
    inertia = inertia + jnp.sum(d2_B)
    if stats:
      # One-hot matmul, not segment_sum: deterministic (no scatter atomics) and MXU-friendly.
      onehot_BxK = (a_B[:, None] == jnp.arange(k)[None, :]).astype(x_BxD.dtype) * w_B[:, None]
      sums_KxD = sums_KxD + jnp.einsum("bk,bd->kd", onehot_BxK, x_BxD, precision=_PRECISION)
      counts_K = counts_K + jnp.sum(onehot_BxK, axis=0)
    return (sums_KxD, counts_K, inertia), (a_B, d2_B)

  init = (
      jnp.zeros((k, d), jnp.float32) if stats else None,
      jnp.zeros((k,), jnp.float32) if stats else None,
      jnp.zeros((), jnp.float32),
  )
  (sums_KxD, counts_K, inertia), (a_SxB, d2_SxB) = lax.scan(step, init, jnp.arange(s))
  a_N = _constrain(a_SxB.T, st.sharding).reshape(n_pad)
  d2_N = _constrain(d2_SxB.T, st.sharding).reshape(n_pad)
  return sums_KxD, counts_K, inertia, _constrain(a_N, st.sharding), _constrain(d2_N, st.sharding)


def _cumsum(d2_N: jax.Array, st: _Static) -> jax.Array:
  """Inclusive cumsum in two levels, per shard then over shard totals: a plain cumsum over the
  split axis makes XLA all-gather it."""
  p = _num_shards(st.sharding)
  d2_PxM = _constrain(d2_N.reshape(p, -1), st.sharding)
  cum_PxM = jnp.cumsum(d2_PxM, axis=1)
  offset_P = jnp.cumsum(cum_PxM[:, -1]) - cum_PxM[:, -1]
  return _constrain((cum_PxM + offset_P[:, None]).reshape(-1), st.sharding)


def _kmeans_plusplus(x_NxD, xx_N, w_N, n, rng, st: _Static) -> jax.Array:
  """Greedy k-means++ (sklearn's `_kmeans_plusplus`): D^2 sampling with L local trials."""
  k = st.num_clusters
  num_trials = 2 + int(np.log(k))
  rng_first, rng_rest = jax.random.split(rng)
  first = jax.random.randint(rng_first, (1,), 0, n)
  c0_1xD = _rows(x_NxD, first, st)
  d2_N = _sq_dists(x_NxD, xx_N, c0_1xD)[:, 0] * w_N
  c_KxD = jnp.zeros((k, x_NxD.shape[1]), jnp.float32).at[0].set(c0_1xD[0])

  def body(t, carry):
    c_KxD, d2_N = carry
    cum_N = _cumsum(d2_N, st)
    u_L = jax.random.uniform(jax.random.fold_in(rng_rest, t), (num_trials,)) * cum_N[-1]
    # searchsorted(side='right') as a count: local per shard, and never picks a point of
    # weight 0 (padding, or a point on a centre).
    idx_L = jnp.sum(cum_N[:, None] <= u_L[None, :], axis=0)
    idx_L = jnp.minimum(idx_L, n - 1)
    cand_LxD = _rows(x_NxD, idx_L, st)
    d2_NxL = jnp.minimum(d2_N[:, None], _sq_dists(x_NxD, xx_N, cand_LxD)) * w_N[:, None]
    best = jnp.argmin(jnp.sum(d2_NxL, axis=0))
    d2_N = _constrain(lax.dynamic_index_in_dim(d2_NxL, best, axis=1, keepdims=False), st.sharding)
    return c_KxD.at[t].set(cand_LxD[best]), d2_N

  c_KxD, _ = lax.fori_loop(1, k, body, (c_KxD, d2_N))
  return c_KxD


def _random_init(x_NxD, n, rng, st: _Static) -> jax.Array:
  """K distinct points uniformly (faiss's init); per-index keys make it padding-invariant."""
  n_pad = x_NxD.shape[0]
  u_N = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(jnp.arange(n_pad))
  u_N = jnp.where(jnp.arange(n_pad) < n, u_N, jnp.inf)
  _, idx_K = lax.top_k(-u_N, st.num_clusters)
  return _rows(x_NxD, idx_K, st)


def _reseed(x_NxD, w_N, c_KxD, empty_K, d2_N, st: _Static) -> jax.Array:
  """Moves each empty centre onto the point farthest from every centre so far.

  Farthest-first (one point at a time, distances updated after each) picks distinct points, so
  duplicates of one far point cannot fill two empty clusters. Deterministic: no rng.
  """
  k = c_KxD.shape[0]
  (empty_idx,) = jnp.nonzero(empty_K, size=k, fill_value=0)

  def body(j, carry):
    c_KxD, d2_N = carry
    c_1xD = _rows(x_NxD, jnp.argmax(d2_N)[None], st)
    # Direct differences, not the expansion: duplicates of the new centre get exactly 0.
    new_d2_N = jnp.sum(jnp.square(x_NxD - c_1xD), axis=-1) * w_N
    return c_KxD.at[empty_idx[j]].set(c_1xD[0]), jnp.minimum(d2_N, new_d2_N)

  c_KxD, _ = lax.fori_loop(0, jnp.sum(empty_K), body, (c_KxD, d2_N))
  return c_KxD


def _lloyd(x_NxD, xx_N, w_N, c_KxD, tol, st: _Static):
  """Lloyd iterations in one while_loop: (centres, iterations run, inertia history)."""

  def cond(carry):
    t, _, _, _, _, done = carry
    return (t < st.num_iters) & ~done

  def body(carry):
    t, c_KxD, prev_inertia, prev_empty, hist_I, _ = carry
    sums_KxD, counts_K, inertia, _, _ = _lloyd_pass(x_NxD, xx_N, w_N, c_KxD, st, stats=True)
    empty_K = counts_K == 0
    num_empty = jnp.sum(empty_K)
    new_c_KxD = jnp.where(
        empty_K[:, None], c_KxD, sums_KxD / jnp.maximum(counts_K, 1.0)[:, None]
    )
    if st.distance == "cosine":
      new_c_KxD = _normalize(new_c_KxD)

    def reseed(c_KxD):
      # Distances to the updated non-empty centres, so the chosen points are the worst served.
      _, _, _, _, d2_N = _lloyd_pass(x_NxD, xx_N, w_N, c_KxD, st, stats=False, valid_K=~empty_K)
      return _reseed(x_NxD, w_N, c_KxD, empty_K, d2_N, st)

    new_c_KxD = lax.cond(num_empty > 0, reseed, lambda c: c, new_c_KxD)
    converged = (t > 0) & (jnp.abs(prev_inertia - inertia) <= tol * prev_inertia)
    # Keep going while re-seeding still fills clusters; stop if it cannot (< K distinct points).
    done = converged & ((num_empty == 0) | (num_empty >= prev_empty))
    return t + 1, new_c_KxD, inertia, num_empty, hist_I.at[t].set(inertia), done

  k = c_KxD.shape[0]
  hist_I = jnp.full((st.num_iters,), jnp.nan, jnp.float32)
  carry = (jnp.int32(0), c_KxD, jnp.float32(jnp.inf), jnp.int32(k + 1), hist_I, jnp.bool_(False))
  t, c_KxD, _, _, hist_I, _ = lax.while_loop(cond, body, carry)
  return c_KxD, t, hist_I


def _run_impl(x_NxD, n, rng, init_KxD, tol, st: _Static) -> KMeansResult:
  """One restart on padded, placed points: seeding, Lloyd, then a final assignment pass."""
  x_NxD, xx_N, w_N, shift_D = _prepare(x_NxD, n, st)
  if st.init == "given":
    c_KxD = init_KxD.astype(jnp.float32)
    c_KxD = _normalize(c_KxD) if st.distance == "cosine" else c_KxD - shift_D[None, :]
  elif st.init == "random":
    c_KxD = _random_init(x_NxD, n, rng, st)
  else:
    c_KxD = _kmeans_plusplus(x_NxD, xx_N, w_N, n, rng, st)
  if st.num_iters > 0:
    c_KxD, t, hist_I = _lloyd(x_NxD, xx_N, w_N, c_KxD, tol, st)
  else:
    t, hist_I = jnp.int32(0), jnp.zeros((0,), jnp.float32)
  _, _, inertia, a_N, _ = _lloyd_pass(x_NxD, xx_N, w_N, c_KxD, st, stats=False)
  return KMeansResult(
      centers_KxD=c_KxD + shift_D[None, :],
      assignments_N=a_N,
      inertia=inertia,
      num_iters_run=t,
      inertia_history_I=hist_I,
      restart_inertias_R=inertia[None],
  )


_run = jax.jit(_run_impl, static_argnames=("st",))


def _assign_impl(x_NxD, n, c_KxD, st: _Static):
  x_NxD, xx_N, w_N, shift_D = _prepare(x_NxD, n, st)
  c_KxD = _normalize(c_KxD) if st.distance == "cosine" else c_KxD - shift_D[None, :]
  _, _, inertia, a_N, d2_N = _lloyd_pass(x_NxD, xx_N, w_N, c_KxD, st, stats=False)
  return a_N, d2_N, inertia


_assign = jax.jit(_assign_impl, static_argnames=("st",))


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def _check(x_NxD, distance: str, chunk_size: int | None) -> tuple[int, int]:
  if len(x_NxD.shape) != 2 or x_NxD.shape[0] < 1:
    raise ValueError(f"x_NxD must have shape [N >= 1, D], got {tuple(x_NxD.shape)}.")
  if distance not in ("l2", "cosine"):
    raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}.")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}.")
  return x_NxD.shape


def kmeans(
    x_NxD: jax.Array | np.ndarray,
    num_clusters: int,
    *,
    rng: jax.Array,
    num_iters: int = 300,
    num_restarts: int = 1,
    tol: float = 1e-4,
    init: Init | jax.Array | np.ndarray = "k-means++",
    partitioner: partitioning.Partitioner | None = None,
    distance: Distance = "l2",
    chunk_size: int | None = None,
    pad_to: int | None = None,
) -> KMeansResult:
  """Clusters N points into K clusters; returns the best of `num_restarts` runs by inertia.

  Each restart seeds the centres (greedy k-means++ or K distinct random points), then runs Lloyd
  iterations inside one `lax.while_loop` until `num_iters` or until the relative inertia change
  is at most `tol` (note: sklearn's `tol` is on the centre shift instead; faiss runs `niter`
  iterations with no tolerance, which `tol=0` approximates). Clusters left empty by an assignment
  step are re-seeded with the points farthest from their centres, so K non-empty clusters come
  out whenever there are at least K distinct points. Deterministic for a given `rng`.

  Args:
    x_NxD: float [N, D] points, on the host or a jax.Array (replicated or split over `batch`).
    num_clusters: K, with 1 <= K <= N.
    rng: PRNG key; restart r uses `jax.random.split(rng, num_restarts)[r]`.
    num_iters: maximum Lloyd iterations per restart (0: return the seeding).
    num_restarts: R independent seedings; the lowest final inertia wins (first on ties).
    tol: stop when |inertia_prev - inertia| <= tol * inertia_prev.
    init: "k-means++", "random", or a float [K, D] array of initial centres (then R must be 1).
    partitioner: splits the points over its mesh axes for `batch` (centres replicated). None:
      the default device. Results match the single-device run up to float summation order.
    distance: "l2", or "cosine" (spherical k-means: points and centres are L2-normalised, and
      distances are |x/|x| - c|^2 = 2 - 2 cos).
    chunk_size: points per device per chunk; default keeps each B x K distance block at
      2^22 floats. Padding to whole chunks does not change the result.
    pad_to: lay the points out as if there were at least this many (padding rows do not count):
      calls with different N under the same `pad_to` share one compiled program.

  Returns:
    A `KMeansResult` whose `assignments_N` has exactly N entries.
  """
  n, d = _check(x_NxD, distance, chunk_size)
  if not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters ({num_clusters}) must be in [1, N={n}].")
  if num_restarts < 1 or num_iters < 0 or tol < 0:
    raise ValueError(
        f"Need num_restarts >= 1, num_iters >= 0, tol >= 0; got {num_restarts}, {num_iters}, "
        f"{tol}."
    )
  if isinstance(init, str):
    if init not in ("k-means++", "random"):
      raise ValueError(f"init must be 'k-means++', 'random' or an array, got {init!r}.")
    mode = init
  else:
    if tuple(init.shape) != (num_clusters, d):
      raise ValueError(f"init centres must have shape {(num_clusters, d)}, got {init.shape}.")
    if num_restarts != 1:
      raise ValueError(f"Given init centres need num_restarts == 1, got {num_restarts}.")
    mode = "given"
  sharding, num_shards = _points_sharding(partitioner)
  init_KxD = None
  if mode == "given":
    replicated = None if sharding is None else NamedSharding(sharding.mesh, P())
    init_KxD = jax.device_put(np.asarray(init, np.float32), replicated)
  b, s = _layout(max(n, pad_to or 0), num_shards, chunk_size, num_clusters)
  x_pad = _place(x_NxD, b * s, _leading(sharding, 2))
  st = _Static(num_clusters, num_iters, mode, distance, s, sharding)
  rngs = jax.random.split(rng, num_restarts)
  n_arr = jnp.int32(n)
  tol_arr = jnp.float32(tol)
  runs = [_run(x_pad, n_arr, rngs[r], init_KxD, tol_arr, st=st) for r in range(num_restarts)]
  inertias_R = jnp.stack([run.inertia for run in runs])
  best = runs[int(jnp.argmin(inertias_R))]
  return best.replace(assignments_N=best.assignments_N[:n], restart_inertias_R=inertias_R)


def size_bucket(n: int) -> int:
  """The power of two >= n: `kmeans(pad_to=size_bucket(n))` calls on groups of varying sizes
  share a compiled program per bucket instead of compiling one per size."""
  return 1 << (n - 1).bit_length()


def assign(
    x_NxD: jax.Array | np.ndarray,
    centers_KxD: jax.Array | np.ndarray,
    *,
    distance: Distance = "l2",
    partitioner: partitioning.Partitioner | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Nearest centre of each point (ties: the lowest index), in chunks of B x K distances.

  Args:
    x_NxD: float [N, D] points.
    centers_KxD: float [K, D] centres.
    distance: "l2" or "cosine" (both sides normalised; distance 2 - 2 cos).
    partitioner: splits the points over `batch` as in `kmeans`; None: the default device.
    chunk_size: points per device per chunk (default: 2^22 / K).

  Returns:
    (assignments_N int32 [N], sq_distances_N float32 [N]).
  """
  a_N, d2_N, _ = _assign_padded(x_NxD, centers_KxD, distance, partitioner, chunk_size)
  n = x_NxD.shape[0]
  return a_N[:n], d2_N[:n]


def inertia(
    x_NxD: jax.Array | np.ndarray,
    centers_KxD: jax.Array | np.ndarray,
    *,
    distance: Distance = "l2",
    partitioner: partitioning.Partitioner | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
  """The k-means objective of `centers_KxD` on `x_NxD`.

  Args:
    x_NxD: float [N, D] points.
    centers_KxD: float [K, D] centres.
    distance: "l2" or "cosine", as in `assign`.
    partitioner: splits the points over `batch`; None: the default device.
    chunk_size: points per device per chunk (default: 2^22 / K).

  Returns:
    float32 [] sum over points of the squared distance to the nearest centre.
  """
  return _assign_padded(x_NxD, centers_KxD, distance, partitioner, chunk_size)[2]


def _assign_padded(x_NxD, centers_KxD, distance, partitioner, chunk_size):
  n, d = _check(x_NxD, distance, chunk_size)
  k = centers_KxD.shape[0]
  if tuple(centers_KxD.shape) != (k, d) or k < 1:
    raise ValueError(f"centers_KxD must have shape [K >= 1, {d}], got {centers_KxD.shape}.")
  sharding, num_shards = _points_sharding(partitioner)
  b, s = _layout(n, num_shards, chunk_size, k)
  x_pad = _place(x_NxD, b * s, _leading(sharding, 2))
  replicated = None if sharding is None else NamedSharding(sharding.mesh, P())
  c_KxD = jax.device_put(jnp.asarray(centers_KxD, jnp.float32), replicated)
  st = _Static(k, 0, "given", distance, s, sharding)
  return _assign(x_pad, jnp.int32(n), c_KxD, st=st)

