"""Optimizers (optax) with their learning-rate schedules, chosen in gin."""

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and its schedule (the trainer logs `learning_rate(step)`)."""

  tx: optax.GradientTransformation
  learning_rate: optax.Schedule


def warmup_then_decay(
    peak: float, warmup_steps: int, total_steps: int, decay: str = "linear", end_factor=0.0
) -> optax.Schedule:
  """Linear warmup to `peak`, then `linear`, `cosine`, `rsqrt` decay or `constant`."""
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  if decay == "linear":
    after = optax.linear_schedule(peak, peak * end_factor, rest)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=end_factor)
  elif decay == "rsqrt":
    # T5's inverse square root, continued from the end of warmup.
    w = max(warmup_steps, 1)
    after = lambda count: peak * (w / (count + w)) ** 0.5  # noqa: E731
  elif decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown decay {decay!r}: expected linear, cosine, rsqrt or constant.")
  return optax.join_schedules([warmup, after], [warmup_steps])


def adamw(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "linear",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> Optimizer:
  """AdamW with warmup and decay; the Hugging Face Trainer defaults the reference used."""
  schedule = warmup_then_decay(learning_rate, warmup_steps, total_steps, decay)
  tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return Optimizer(tx, schedule)


def adafactor(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "rsqrt",
    clip_norm: float | None = None,
) -> Optimizer:
  """Adafactor (factored second moments, T5's optimizer) with warmup and decay."""
  schedule = warmup_then_decay(learning_rate, warmup_steps, total_steps, decay)
  tx = optax.adafactor(learning_rate=schedule)
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return Optimizer(tx, schedule)
