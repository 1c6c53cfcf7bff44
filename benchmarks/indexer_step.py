r"""Time of the indexer's training step per stage kind, and of its reconstruction loss.

  .venv/bin/python benchmarks/indexer_step.py
  .venv/bin/python benchmarks/indexer_step.py --data=brown --gin.MAX_LENGTH=128

Builds the indexer of `gin/runs/index.gin` + `gin/data/<data>.gin` (`--gin.KEY=VALUE` overrides
a binding) on the first documents of its corpus and times `jax.value_and_grad` of its loss at
each stage kind (warm-up, no-codebook and quantized at positions 1 and 2: position 2 adds the
same-prefix contrastive and the commitment terms), then the reconstruction loss alone scored in
chunks (`losses.chunked_token_cross_entropy`, what the indexer uses) and with the whole
[B, L, V] logits in memory (`losses.token_cross_entropy`). One JSON line per measurement:
compile seconds (trace, lower and compile) and the median and minimum milliseconds per call
over `--repeats` blocks of `--calls` calls.
"""

import json
import time

from absl import flags
import numpy as np

_DATA = flags.DEFINE_string("data", "synthetic", "A gin/data/<data>.gin with an INDEX_TASK.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed blocks per measurement (median, min kept).")
_CALLS = flags.DEFINE_integer("calls", 10, "Calls per timed block.")


def run(job=None) -> None:
  """`gin/runs/index.gin` binds the command's job as `__main__.run.job`; here nothing runs it."""
  del job


def _time(name: str, fn, *args) -> None:
  import jax

  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  blocks = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_CALLS.value):
      out = compiled(*args)
    jax.block_until_ready(out)
    blocks.append(1000 * (time.perf_counter() - start) / _CALLS.value)
  print(json.dumps({"measure": name, "compile_s": round(compile_s, 2),
                    "ms_median": round(float(np.median(blocks)), 2),
                    "ms_min": round(min(blocks), 2)}), flush=True)


def main(argv: list[str]) -> None:
  del argv
  import gin
  import jax
  import jax.numpy as jnp

  from lmindexer_jax import gin_utils
  from lmindexer_jax import index_pipeline
  from lmindexer_jax import indexer
  from lmindexer_jax import losses
  from lmindexer_jax import reconstructor
  from lmindexer_jax import t5
  from lmindexer_jax import vocabularies

  # MODEL_DIR is required by index.gin but nothing is written.
  gin_utils.parse(["gin/runs/index.gin", f"gin/data/{_DATA.value}.gin"],
                  ["MODEL_DIR = 'unused'", *flags.FLAGS.gin_bindings],
                  flags.FLAGS.gin_search_paths)
  gin_utils.configure_task_settings()
  config = gin.get_configurable(indexer.IndexerConfig)()
  schedule = gin.get_configurable(index_pipeline.Schedule)()
  max_length = gin.query_parameter("MAX_LENGTH/macro.value")
  corpus = index_pipeline.load_corpus(gin.query_parameter("INDEX_TASK/macro.value"), max_length)
  layout = vocabularies.IdLayout(corpus.base_vocab_size, tuple(config.codebook_sizes))
  t5_config = gin.get_configurable(t5.T5Config)(vocab_size=layout.vocab_size)
  module = indexer.SemanticIndexer(t5_config, layout, config)
  print(json.dumps({"data": _DATA.value, "batch_size": schedule.batch_size,
                    "max_length": max_length, "vocab_size": layout.vocab_size,
                    "emb_dim": t5_config.emb_dim, "devices": jax.device_count()}), flush=True)

  # Any codes will do for timing: they only group the siblings and give the commitment targets
  # (and stand in for the k-means codes of a quantized stage with code commitment).
  codes_Nx2 = np.random.default_rng(0).integers(
      0, min(config.codebook_sizes[:2]), (len(corpus.tokens_NxL), 2)).astype(np.int32)
  codes_Nx1 = codes_Nx2[:, :1]
  stages = {
      "warmup": (indexer.Stage(0, use_codebook=False, freeze_t5=True), None),
      "nocode_0": (indexer.Stage(0, use_codebook=False), None),
      "quantized_0": (indexer.Stage(0, use_codebook=True), None),
      "nocode_1": (indexer.Stage(1, use_codebook=False), codes_Nx1),
      "quantized_1": (indexer.Stage(1, use_codebook=True), codes_Nx1),
  }
  rng = jax.random.PRNGKey(1)
  params = None
  for name, (stage, prefix_NxP) in stages.items():
    if stage.position >= len(config.codebook_sizes):
      continue
    model = indexer.IndexerModel(module, stage)
    code_targets_N = None
    if stage.use_codebook and config.code_commitment_weight:
      code_targets_N = codes_Nx2[:, stage.position]
    batches = index_pipeline.DocumentBatches(
        corpus.tokens_NxL, schedule.batch_size, seed=0, prefix_codes_NxP=prefix_NxP,
        num_negatives=config.num_negatives, code_targets_N=code_targets_N)
    batch = jax.tree.map(jnp.asarray, next(batches))
    params = model.init_params(jax.random.PRNGKey(0), batch)
    _time(f"loss_and_grad/{name}", jax.value_and_grad(model.loss_fn, has_aux=True),
          params, batch, rng)

  # The reconstruction loss alone, at the training batch's shapes ([B, L] tokens, [D, V] head).
  tokens_BxL = batch["encoder_input_tokens"]
  weights_BxL = reconstructor.target_mask(tokens_BxL)
  hidden_BxLxD = jax.random.normal(rng, (*tokens_BxL.shape, t5_config.emb_dim))
  head_DxV = module.apply(indexer.variables(params), method=indexer.SemanticIndexer.lm_head)

  def chunked(h, w):
    return losses.chunked_token_cross_entropy(h, w, tokens_BxL, weights_BxL)[0]

  def whole(h, w):
    return losses.token_cross_entropy(h @ w, tokens_BxL, weights_BxL)[0]

  for name, fn in (("chunked", chunked), ("whole_logits", whole)):
    _time(f"reconstruction_cross_entropy_grad/{name}", jax.grad(fn, argnums=(0, 1)),
          hidden_BxLxD, head_DxV)


if __name__ == "__main__":
  from lmindexer_jax import gin_utils

  gin_utils.launch(main)
