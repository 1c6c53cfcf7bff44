"""RQ-VAE IDs (TIGER): an MLP autoencoder whose latent is quantized by a residual quantizer.

  z = r_0 = encoder MLP(x);  level t: c_t = argmin_k |r_t - E_t[k]|,  r_{t+1} = r_t - sg(E_t[c_t])
  z_q = sum_t E_t[c_t];  x_hat = decoder MLP(z + sg(z_q - z))   (straight-through estimator)

  loss = |x - x_hat|^2 + sum_t |sg(r_t) - E_t[c_t]|^2 + beta |r_t - sg(E_t[c_t])|^2

(squared norms, averaged over the batch). The codebook term moves each codebook towards its
residuals; the commitment term (beta 0.25, as in TIGER) keeps the encoder near its codes; the
residual passed on is cut from the gradient, so level t's codebook learns from its own term only.

Codebooks start from k-means (`kmeans.kmeans`) on the residuals of the first batch (or of all
vectors), level by level. Dead codes: a code no document of the last `reset_window` steps'
batches used is re-seeded with a random residual of the current batch at its level.

Legend: N documents, D input dims, Z latent dims, B batch, C levels, K codes, S steps.
"""

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any

from flax import struct
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from lmindexer_jax import kmeans

_PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RqVaeConfig:
  """Hyperparameters of the RQ-VAE and its training (codebook sizes come separately).

  Attributes:
    latent_dim: Z.
    hidden_dims: encoder hidden widths; the decoder mirrors them.
    num_steps: training steps.
    learning_rate: Adam learning rate.
    batch_size: vectors per step (capped at N; must be >= the largest codebook for the init).
    beta: commitment weight.
    reset_window: dead-code window in steps (0: never reset).
    init_on_all: k-means init on every vector's residuals instead of the first batch's.
    kmeans_iters: Lloyd iterations of the init.
  """

  latent_dim: int = 16
  hidden_dims: tuple[int, ...] = (128, 64)
  num_steps: int = 1500
  learning_rate: float = 1e-3
  batch_size: int = 256
  beta: float = 0.25
  reset_window: int = 100
  init_on_all: bool = False
  kmeans_iters: int = 50


class Mlp(nn.Module):
  """Dense layers with ReLU between them (none after the last)."""

  features: Sequence[int]

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x_BxD = nn.Dense(f, name=f"dense_{i}")(x_BxD)
      if i + 1 < len(self.features):
        x_BxD = nn.relu(x_BxD)
    return x_BxD


class RqVae(nn.Module):
  """Encoder, residual quantizer (`codebook_{t}` [K_t, Z] parameters) and decoder."""

  input_dim: int
  codebook_sizes: tuple[int, ...]
  latent_dim: int
  hidden_dims: tuple[int, ...]

  def setup(self):
    self.encoder = Mlp((*self.hidden_dims, self.latent_dim))
    self.decoder = Mlp((*reversed(self.hidden_dims), self.input_dim))
    self.codebooks = [
        self.param(f"codebook_{t}", nn.initializers.normal(1.0), (k, self.latent_dim))
        for t, k in enumerate(self.codebook_sizes)
    ]

  def encode(self, x_BxD: jax.Array) -> jax.Array:
    return self.encoder(x_BxD)

  def quantize(self, z_BxZ: jax.Array) -> dict[str, jax.Array]:
    """Residual quantization: codes [B, C], z_q [B, Z], residuals r_t [C, B, Z], losses."""
    r_BxZ = z_BxZ
    codes, residuals, quantized = [], [], []
    codebook_loss = commitment_loss = jnp.zeros((), jnp.float32)
    for e_KxZ in self.codebooks:
      d_BxK = (jnp.sum(r_BxZ**2, -1, keepdims=True)
               - 2 * jnp.einsum("bz,kz->bk", r_BxZ, e_KxZ, precision=_PRECISION)
               + jnp.sum(e_KxZ**2, -1)[None, :])
      c_B = jnp.argmin(d_BxK, axis=-1).astype(jnp.int32)
      e_BxZ = e_KxZ[c_B]
      codebook_loss += jnp.mean(jnp.sum((lax.stop_gradient(r_BxZ) - e_BxZ)**2, -1))
      commitment_loss += jnp.mean(jnp.sum((r_BxZ - lax.stop_gradient(e_BxZ))**2, -1))
      codes.append(c_B)
      residuals.append(r_BxZ)
      quantized.append(e_BxZ)
      r_BxZ = r_BxZ - lax.stop_gradient(e_BxZ)
    return {
        "codes_BxC": jnp.stack(codes, axis=1),
        "z_q_BxZ": sum(quantized),
        "residuals_CxBxZ": jnp.stack(residuals),
        "codebook_loss": codebook_loss,
        "commitment_loss": commitment_loss,
    }

  def __call__(self, x_BxD: jax.Array) -> dict[str, jax.Array]:
    z_BxZ = self.encode(x_BxD)
    out = self.quantize(z_BxZ)
    z_st_BxZ = z_BxZ + lax.stop_gradient(out["z_q_BxZ"] - z_BxZ)
    x_hat_BxD = self.decoder(z_st_BxZ)
    out["reconstruction_loss"] = jnp.mean(jnp.sum((x_BxD - x_hat_BxD)**2, -1))
    return out


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  usage_CxK: jax.Array  # float32: uses of each code in the current window (K = max K_t)


def reset_dead_codes(codebook_KxZ: jax.Array, usage_K: jax.Array, residuals_BxZ: jax.Array,
                     rng: jax.Array) -> jax.Array:
  """Codes with zero usage move onto random residuals of the batch (distinct ones if B >= K);
  the others stay."""
  k, b = codebook_KxZ.shape[0], residuals_BxZ.shape[0]
  idx_K = jax.random.choice(rng, b, (k,), replace=b < k)
  return jnp.where((usage_K == 0)[:, None], residuals_BxZ[idx_K], codebook_KxZ)


@functools.lru_cache(maxsize=16)
def make_train_step(model: RqVae, tx: optax.GradientTransformation, beta: float,
                    reset_window: int):
  """A jitted step: (state, x_BxD, rng) -> (state, metrics).

  After the update, at the end of each window of `reset_window` steps, unused codes are
  re-seeded (`reset_dead_codes`) and the usage counts restart. Cached, so equal arguments
  reuse one compiled step.
  """
  sizes = model.codebook_sizes
  k_max = max(sizes)

  def loss_fn(params, x_BxD):
    out = model.apply({"params": params}, x_BxD)
    loss = out["reconstruction_loss"] + out["codebook_loss"] + beta * out["commitment_loss"]
    return loss, out

  @jax.jit
  def step(state: TrainState, x_BxD: jax.Array, rng: jax.Array):
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x_BxD)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    onehot_BxCxK = out["codes_BxC"][:, :, None] == jnp.arange(k_max)[None, None, :]
    usage_CxK = state.usage_CxK + jnp.sum(onehot_BxCxK, axis=0)
    metrics = {"loss": loss, "dead_codes": jnp.zeros((), jnp.int32),
               **{k: out[k] for k in ("reconstruction_loss", "codebook_loss",
                                      "commitment_loss")}}
    if reset_window:
      at_end = (state.step + 1) % reset_window == 0
      step_rng = jax.random.fold_in(rng, state.step)
      params = dict(params)
      dead = jnp.zeros((), jnp.int32)
      for t in range(len(sizes)):
        name = f"codebook_{t}"
        usage_K = usage_CxK[t, :sizes[t]]
        reset = reset_dead_codes(params[name], usage_K, out["residuals_CxBxZ"][t],
                                 jax.random.fold_in(step_rng, t))
        params[name] = jnp.where(at_end, reset, params[name])
        dead += jnp.where(at_end, jnp.sum(usage_K == 0), 0)
      usage_CxK = jnp.where(at_end, 0.0, usage_CxK)
      metrics["dead_codes"] = dead
    return TrainState(state.step + 1, params, opt_state, usage_CxK), metrics

  return step


def init_state(model: RqVae, tx: optax.GradientTransformation, x_NxD: np.ndarray,
               init_BxD: np.ndarray, *, seed: int, kmeans_iters: int = 50) -> TrainState:
  """Random MLPs; codebook t = k-means centres of the level-t residuals of `init_BxD`."""
  params = _init(model, jax.random.PRNGKey(seed), jnp.asarray(x_NxD[:1]))
  z_BxZ = np.asarray(_encode(model, params, jnp.asarray(init_BxD)))
  params = dict(params)
  for t, k in enumerate(model.codebook_sizes):
    if len(z_BxZ) < k:
      raise ValueError(f"The k-means init needs at least {k} vectors, got {len(z_BxZ)}: "
                       "raise RqVaeConfig.batch_size or set init_on_all.")
    result = kmeans.kmeans(z_BxZ, k, rng=jax.random.PRNGKey(seed + 1 + t),
                           num_iters=kmeans_iters)
    centers_KxZ = np.asarray(result.centers_KxD)
    params[f"codebook_{t}"] = jnp.asarray(centers_KxZ)
    z_BxZ = z_BxZ - centers_KxZ[np.asarray(result.assignments_N)]
  usage = jnp.zeros((len(model.codebook_sizes), max(model.codebook_sizes)), jnp.float32)
  return TrainState(jnp.int32(0), params, tx.init(params), usage)


@struct.dataclass
class RqVaeResult:
  """A trained RQ-VAE's codes.

  Attributes:
    codes_NxC: int32 codes of every vector, level t in [0, codebook_sizes[t]).
    history: float [S] per step: loss, reconstruction_loss, codebook_loss, commitment_loss,
      dead_codes (codes re-seeded at that step).
    params: the trained parameters.
  """

  codes_NxC: np.ndarray
  history: dict[str, np.ndarray]
  params: Any


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Step `step`'s batch: epoch e visits a permutation seeded by (seed, e), no remainder."""
  per_epoch = n // batch_size
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[position * batch_size:(position + 1) * batch_size]


def train_rqvae(x_NxD: np.ndarray, codebook_sizes: Sequence[int], config: RqVaeConfig,
                *, seed: int) -> RqVaeResult:
  """Trains an RQ-VAE on the vectors and returns every vector's codes (deterministic)."""
  x_NxD = np.asarray(x_NxD, np.float32)
  n, d = x_NxD.shape
  sizes = tuple(int(k) for k in codebook_sizes)
  batch_size = min(config.batch_size, n)
  model = RqVae(d, sizes, config.latent_dim, tuple(config.hidden_dims))
  tx = _adam(config.learning_rate)
  first_BxD = x_NxD[batch_indices(n, batch_size, seed, 0)]
  state = init_state(model, tx, x_NxD, x_NxD if config.init_on_all else first_BxD, seed=seed,
                     kmeans_iters=config.kmeans_iters)
  step = make_train_step(model, tx, config.beta, config.reset_window)
  rng = jax.random.PRNGKey(seed + 17)
  metrics = []
  for s in range(config.num_steps):
    state, m = step(state, x_NxD[batch_indices(n, batch_size, seed, s)], rng)
    metrics.append(m)
  history = {k: np.asarray([m[k] for m in metrics]) for k in (metrics[0] if metrics else {})}
  return RqVaeResult(assign_codes(model, state.params, x_NxD), history, state.params)


def assign_codes(model: RqVae, params: Any, x_NxD: np.ndarray,
                 batch_size: int = 4096) -> np.ndarray:
  """int32 [N, C]: the residual quantizer's codes of the encoded vectors."""
  return np.concatenate([np.asarray(_codes(model, params, jnp.asarray(x_NxD[i:i + batch_size])))
                         for i in range(0, len(x_NxD), batch_size)]).astype(np.int32)


# Jitted with the module static, so repeated runs reuse the compiled code (eager Flax init and
# apply would dispatch, and compile, every op one by one).
@functools.partial(jax.jit, static_argnames="model")
def _init(model: RqVae, rng: jax.Array, x_1xD: jax.Array) -> Any:
  return model.init(rng, x_1xD)["params"]


@functools.partial(jax.jit, static_argnames="model")
def _encode(model: RqVae, params: Any, x_BxD: jax.Array) -> jax.Array:
  return model.apply({"params": params}, x_BxD, method=RqVae.encode)


@functools.partial(jax.jit, static_argnames="model")
def _codes(model: RqVae, params: Any, x_BxD: jax.Array) -> jax.Array:
  return model.apply({"params": params}, x_BxD,
                     method=lambda m, x: m.quantize(m.encode(x))["codes_BxC"])


@functools.lru_cache(maxsize=16)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  return optax.adam(learning_rate)
