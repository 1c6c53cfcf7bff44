r"""Milliseconds per seq2seq training step (what every fine-tuning run repeats), by dropout rate.

  .venv/bin/python benchmarks/train_step.py
  .venv/bin/python benchmarks/train_step.py --gin_file=gin/models/t5_small.gin --batch_size=8

Times `train.jit_train_step` (forward, backward, AdamW update; one device) of the model that
`--gin_file` configures (default gin/models/t5_tiny.gin, VOCAB_SIZE = `--vocab_size`;
`--gin.KEY=VALUE` overrides a binding) on one batch of random tokens, `--batch_size` x
(`--inputs_length`, `--targets_length`), at each of `--dropout_rates`: on CPU the dropout masks'
random bits are a large part of a small model's step. One JSON line per rate: compile seconds,
median and minimum milliseconds per step over `--repeats` blocks of `--calls` steps.
"""

import json
import time

from absl import flags
import numpy as np

_BATCH = flags.DEFINE_integer("batch_size", 64, "Sequences per step.")
_INPUTS = flags.DEFINE_integer("inputs_length", 128, "Encoder tokens per sequence.")
_TARGETS = flags.DEFINE_integer("targets_length", 8, "Decoder tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab_size", 2048, "VOCAB_SIZE of the model file.")
_RATES = flags.DEFINE_list("dropout_rates", ["0.0", "0.1"], "Dropout rates to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed blocks per rate (median, min kept).")
_CALLS = flags.DEFINE_integer("calls", 10, "Steps per timed block.")


def main(argv: list[str]) -> None:
  del argv
  import gin
  import jax

  from lmindexer_jax import gin_utils
  from lmindexer_jax import models
  from lmindexer_jax import optimizers
  from lmindexer_jax import partitioning
  from lmindexer_jax import t5
  from lmindexer_jax import train

  gin_utils.parse(flags.FLAGS.gin_file or ["gin/models/t5_tiny.gin"],
                  [f"VOCAB_SIZE = {_VOCAB.value}", *flags.FLAGS.gin_bindings],
                  flags.FLAGS.gin_search_paths)
  config = gin.get_configurable(t5.T5Config)()
  rng = np.random.default_rng(0)
  batch = {
      "encoder_input_tokens": rng.integers(1, config.vocab_size, (_BATCH.value, _INPUTS.value)),
      "decoder_target_tokens": rng.integers(1, config.vocab_size, (_BATCH.value, _TARGETS.value)),
  }
  batch["decoder_input_tokens"] = np.pad(batch["decoder_target_tokens"][:, :-1], ((0, 0), (1, 0)))
  batch["decoder_loss_weights"] = np.ones((_BATCH.value, _TARGETS.value))
  batch = {k: v.astype(np.float32 if k == "decoder_loss_weights" else np.int32)
           for k, v in batch.items()}
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  print(json.dumps({"emb_dim": config.emb_dim, "layers": config.num_encoder_layers,
                    "vocab_size": config.vocab_size, "batch_size": _BATCH.value,
                    "inputs_length": _INPUTS.value, "targets_length": _TARGETS.value,
                    "devices": 1}), flush=True)
  partitioner = partitioning.Partitioner(num_devices=1)
  tx = optimizers.adamw(1e-3, total_steps=1000, warmup_steps=10, decay="linear").tx
  for rate in map(float, _RATES.value):
    model = models.EncoderDecoderModel(t5.Transformer(config.replace(dropout_rate=rate)))
    shardings, init = train.state_shardings(model, tx, partitioner, spec)
    with partitioner.activate():
      state = init(jax.random.PRNGKey(0))
      placed = partitioner.global_batch(batch)
      start = time.perf_counter()
      step = train.jit_train_step(model, tx, partitioner, shardings, spec)
      state, metrics = step(state, placed, jax.random.PRNGKey(1))
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - start
      blocks = []
      for i in range(_REPEATS.value):
        start = time.perf_counter()
        for j in range(_CALLS.value):
          state, metrics = step(state, placed, jax.random.PRNGKey(2 + i * _CALLS.value + j))
        jax.block_until_ready(metrics)
        blocks.append(1000 * (time.perf_counter() - start) / _CALLS.value)
    print(json.dumps({"dropout_rate": rate, "compile_s": round(compile_s, 2),
                      "ms_median": round(float(np.median(blocks)), 2),
                      "ms_min": round(min(blocks), 2)}), flush=True)


if __name__ == "__main__":
  from lmindexer_jax import gin_utils

  gin_utils.launch(main)
