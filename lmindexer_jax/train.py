r"""Trains a model on a seqio task: sharded, checkpointed, resumable.

  python -m lmindexer_jax.train \
    --gin_file=gin/models/t5_tiny.gin --gin_file=gin/runs/seq2seq_smoke.gin \
    --gin.MODEL_DIR="'runs/smoke'"

Rerunning with the same MODEL_DIR resumes from the latest checkpoint (parameters, optimizer,
step and input position; the step's RNG is derived from the seed and the step). SIGTERM saves a
checkpoint at the next step boundary and exits 0.
"""

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from lmindexer_jax import checkpoints
from lmindexer_jax import data
from lmindexer_jax import files
from lmindexer_jax import models
from lmindexer_jax import optimizers
from lmindexer_jax import partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any


def train_step(
    state: TrainState,
    batch: models.Batch,
    rng: jax.Array,
    *,
    model: models.BaseModel,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; the dropout RNG is `rng` folded with the step, so it resumes."""
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, batch, step_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  state_updates = metrics.pop(models.STATE_UPDATES, None)
  if state_updates is not None:
    params = models.apply_state_updates(params, state_updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  return TrainState(state.step + 1, params, opt_state), metrics


def state_shardings(
    model: models.BaseModel,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    batch_spec: models.Batch,
) -> tuple[TrainState, Callable[[jax.Array], TrainState]]:
  """The train state's shardings and a jitted init that creates it directly in them.

  Parameters shard by their logical axes; parameter-shaped optimizer leaves follow their
  parameter; the rest is replicated.
  """
  rng_spec = jax.ShapeDtypeStruct((2,), jnp.uint32)
  boxed = jax.eval_shape(model.init_params, rng_spec, batch_spec)
  param_shardings = partitioner.shardings(nn.get_partition_spec(boxed))
  abstract_params = jax.tree.map(
      lambda x: x.unbox(apply_constraint=False), boxed,
      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
  )
  opt_shardings = partitioning.optimizer_state_shardings(
      tx, abstract_params, param_shardings, partitioner.mesh
  )
  shardings = TrainState(partitioner.replicated, param_shardings, opt_shardings)

  def init(rng):
    params = nn.meta.unbox(model.init_params(rng, batch_spec))
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  return shardings, jax.jit(init, out_shardings=shardings)


def state_from_params(
    params: Any, abstract_state: TrainState, shardings: TrainState,
    tx: optax.GradientTransformation,
) -> TrainState:
  """A step-0 state around given (e.g. pretrained) parameters, placed on `shardings`."""
  expected = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
  given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, x in expected:
    if path not in given:
      raise ValueError(f"Initial parameters lack {jax.tree_util.keystr(path)} {x.shape}.")
    if tuple(np.shape(given[path])) != x.shape:
      raise ValueError(
          f"Initial parameter {jax.tree_util.keystr(path)} has shape {np.shape(given[path])}, "
          f"the model expects {x.shape}."
      )
  if len(given) != len(expected):
    extra = sorted(jax.tree_util.keystr(p) for p in set(given) - {p for p, _ in expected})
    raise ValueError(f"Initial parameters have entries the model lacks: {extra}.")
  params = jax.tree.map(
      lambda x, a: jnp.asarray(x, a.dtype), params, abstract_state.params
  )
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step, params, opt_state)


def jit_train_step(
    model: models.BaseModel,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    shardings: TrainState,
    batch_spec: models.Batch,
) -> Callable[[TrainState, models.Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted once with explicit shardings; the input state is donated."""
  batch_shardings = {k: partitioner.batch_sharding(len(v.shape)) for k, v in batch_spec.items()}
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx),
      in_shardings=(shardings, batch_shardings, partitioner.replicated),
      out_shardings=(shardings, partitioner.replicated),
      donate_argnums=0,
  )


class _Reporter:
  """Metrics to TensorBoard and `metrics.jsonl` (process 0 only) and a progress line."""

  def __init__(self, model_dir: str, total_steps: int, first_step: int):
    from clu import metric_writers  # TensorBoard writer; imported lazily (pulls in TF).

    self._is_main = jax.process_index() == 0
    self._writer = metric_writers.create_default_writer(
        os.path.join(model_dir, "tensorboard"), just_logging=not self._is_main
    )
    self._jsonl = os.path.join(model_dir, "metrics.jsonl")
    self._total = total_steps
    self._first = first_step
    self._last_step, self._last_time = first_step, time.time()
    self._start_time = self._last_time
    if self._is_main:
      _truncate_jsonl(self._jsonl, first_step)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    now = time.time()
    steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
    scalars = dict(scalars, steps_per_s=steps_per_s)
    if "input_tokens" in scalars:
      scalars["tokens_per_s"] = steps_per_s * (scalars["input_tokens"] + scalars["target_tokens"])
    self._last_step, self._last_time = step, now
    self._writer.write_scalars(step, scalars)
    if self._is_main:
      with open(self._jsonl, "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")
      done = (step - self._first) / max(now - self._start_time, 1e-9)
      eta = (self._total - step) / max(done, 1e-9)
      tokens = f"{scalars['tokens_per_s']:.0f} tok/s " if "tokens_per_s" in scalars else ""
      print(
          f"[train] step {step}/{self._total} loss {scalars['loss']:.4f} "
          f"lr {scalars['learning_rate']:.2e} {steps_per_s:.2f} steps/s {tokens}"
          f"ETA {_format_seconds(eta)}",
          flush=True,
      )

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[train] {message}", flush=True)


def _format_seconds(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _truncate_jsonl(path: str, after_step: int) -> None:
  """Drops lines logged after `after_step` (a killed run logged past its last checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
  files.write_text(path, "".join(kept))


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
  """An event set by SIGTERM (TPU preemption); the loop checkpoints and stops on it."""
  flag = threading.Event()
  try:
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
  except ValueError:  # Not the main thread: no handler, the flag never fires.
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _preempted(flag: threading.Event, step: int) -> bool:
  if jax.process_count() == 1:
    return flag.is_set()
  # All processes must stop at the same step; JAX's preemption service agrees on it.
  return multihost_utils.reached_preemption_sync_point(step)


def prepare_model_dir(model_dir: str) -> None:
  """Creates `model_dir`; a path that exists and is not a directory is an error."""
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise NotADirectoryError(f"MODEL_DIR {model_dir!r} exists and is not a directory.")
  os.makedirs(model_dir, exist_ok=True)


def train(
    *,
    model: models.BaseModel,
    train_dataset_cfg: data.DatasetConfig | data.BatchIterator,
    optimizer: optimizers.Optimizer,
    total_steps: int,
    model_dir: str,
    partitioner: partitioning.Partitioner | None = None,
    checkpoint_cfg: checkpoints.CheckpointConfig | None = None,
    seed: int = 0,
    log_period: int = 10,
    init_params_fn: Callable[[], Any] | None = None,
    feature_converter_cls: type = data.seqio.EncDecFeatureConverter,
) -> TrainState:
  """Trains `model` for `total_steps` steps, resuming from `model_dir` if it has checkpoints.

  `train_dataset_cfg` names a seqio task (t5x's DatasetConfig) or is any `data.BatchIterator`
  (the indexer's document batches).

  `init_params_fn`, when given, returns the parameters a fresh run starts from (e.g.
  `checkpoint_import.pretrained_params`); they must match the model's shapes.

  Returns:
    The final train state (sharded over the partitioner's mesh).
  """
  prepare_model_dir(model_dir)
  partitioner = partitioner or partitioning.Partitioner()

  # ---------------------------------- Input pipeline -------------------------------------
  iterator = (
      train_dataset_cfg
      if isinstance(train_dataset_cfg, data.BatchIterator)
      else data.SeqioIterator(train_dataset_cfg, feature_converter_cls)
  )
  # Global batch = per-process batch x processes.
  batch_spec = {
      k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype)
      for k, v in iterator.element_spec.items()
  }
  global_batch_size = next(iter(batch_spec.values())).shape[0]
  if global_batch_size % partitioner.data_parallel_size:
    raise ValueError(
        f"batch_size ({global_batch_size}) must be divisible by the data-parallel size "
        f"({partitioner.data_parallel_size})."
    )

  # ------------------------------------ State --------------------------------------------
  shardings, init_state = state_shardings(model, optimizer.tx, partitioner, batch_spec)
  checkpointer = checkpoints.Checkpointer(
      os.path.join(model_dir, "checkpoints"), checkpoint_cfg or checkpoints.CheckpointConfig()
  )
  rng = jax.random.PRNGKey(seed)
  params_rng, dropout_rng = jax.random.split(rng)
  # Restore order: (1) the latest checkpoint in model_dir, (2) `init_params_fn`'s parameters,
  # (3) a fresh initialisation.
  latest = checkpointer.latest_step()
  abstract = checkpoints.abstract_with_shardings(
      jax.eval_shape(init_state, params_rng), shardings
  )
  with partitioner.activate():
    if latest is not None:
      state = checkpointer.restore(latest, abstract, iterator)
      _say(f"resumed from step {latest} in {model_dir}")
    elif init_params_fn is not None:
      state = state_from_params(init_params_fn(), abstract, shardings, optimizer.tx)
    else:
      state = init_state(params_rng)
  step = int(state.step)
  if jax.process_index() == 0:
    _write_model_info(model_dir, state.params, shardings.params)

  step_fn = jit_train_step(model, optimizer.tx, partitioner, shardings, batch_spec)

  # ---------------------------------- Main loop -------------------------------------------
  reporter = _Reporter(model_dir, total_steps, step)
  pending = None  # (step, metrics) of the last step, fetched after dispatching the next.
  with _sigterm_flag() as sigterm, partitioner.activate():
    while step < total_steps:
      batch = partitioner.global_batch(next(iterator))
      state, metrics = step_fn(state, batch, dropout_rng)
      step += 1
      if pending is not None:
        _report(reporter, optimizer, *pending)
      is_last = step == total_steps
      pending = (step, metrics) if step % log_period == 0 or is_last else None
      preempted = _preempted(sigterm, step)
      if step % checkpointer.period == 0 or is_last or preempted:
        checkpointer.save(step, state, iterator)
      if preempted:
        _say(f"SIGTERM: saved a checkpoint at step {step}, stopping")
        break
    if pending is not None:
      _report(reporter, optimizer, *pending)
  checkpointer.close()
  reporter.close()
  return state


def _report(reporter: _Reporter, optimizer: optimizers.Optimizer, step: int, metrics) -> None:
  scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not np.isfinite(scalars["loss"]):
    raise FloatingPointError(f"Non-finite loss {scalars['loss']} at step {step}.")
  scalars["learning_rate"] = float(optimizer.learning_rate(step - 1))
  reporter.write(step, scalars)


def _write_model_info(model_dir: str, params: Any, shardings: Any) -> None:
  """An audit trail: every parameter's shape and sharding, and the total count."""
  lines, total = [], 0
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "spec"))
  for (path, x), s in zip(flat, flat_shardings, strict=True):
    total += x.size
    lines.append(f"{jax.tree_util.keystr(path):80s} {str(x.shape):20s} {s.spec}")
  lines.append(f"Total parameters: {total:,}")
  files.write_text(os.path.join(model_dir, "model-info.txt"), "\n".join(lines) + "\n")


# --------------------------------- Command line (gin) --------------------------------------


def run(job: Callable[[], Any]) -> Any:
  """Runs another job than `train` (bound in gin: `train_script.run.job = @...`)."""
  return job()


def main(argv: list[str]) -> None:
  del argv
  from lmindexer_jax import gin_utils  # The entry point is the only place that knows gin.

  gin_utils.run(train, "train", dispatch=run)


if __name__ == "__main__":
  from lmindexer_jax import gin_utils

  gin_utils.launch(main)
