r"""Constrained beam search throughput: ours (one jitted XLA program) next to Hugging Face.

  .venv/bin/python benchmarks/decode_throughput.py
  .venv/bin/python benchmarks/decode_throughput.py --batch_sizes=1,64 --repeats=2 --beam=20

A T5-small-size model (gin/models/t5_small.gin: 6+6 layers, d_model 512, 8 heads of 64, d_ff
2048, ReLU, tied head) with the vocabulary of 32100 base tokens + 3 x 256 ID tokens, randomly
initialised in PyTorch and imported into ours with `checkpoint_import` (the same weights).
The ID space: 3 positions of 256 codes, 10,000 random valid IDs; queries of 32 random tokens.

Both decode `--beam` beams and return all of them. Hugging Face: `generate(num_beams=beam,
num_return_sequences=beam, max_new_tokens=3, length_penalty=0, prefix_allowed_tokens_fn=...)`
walking a dict trie of the same IDs (the reference implementation's decoder). Ours:
`decoding.IdDecoder` in 'full' mode (exact scores, as HF) and 'restricted' mode (normalised
over the allowed codes; not comparable in scores). Each measurement runs `max(repeats,
ceil(min_queries / batch))` batches after one warm-up batch (which compiles ours). Prints
one JSON line per (implementation, mode, batch size) and a ratio line per (mode, batch size);
the first timed batch also reports how often HF's and our exact top-1 IDs agree.

Two "ceiling" lines per batch size bound any exact decoder on this machine, each optimistic:
- weight_streaming: each decoding step must read the decoder's weights and the whole [D, V]
  head (exact scores normalise over every token), and the query the encoder's, once per batch;
  divided by the rate at which XLA:CPU streams the head through a matrix-vector product here,
  that is the fastest a memory-bound batch can go (FLOPs not counted; the one repeated matrix
  may partly stay in cache where the decoder's 0.5 GB of weights cannot).
- flops: XLA's count of our exact program's floating-point operations per query (the work
  exact scores need: encoder and cross-attention keys/values once per query, one decoder row
  per beam, the full head), the head's share at the rate of a float32 [batch * beam, D] x
  [D, V] product here and the rest at that of [batch * beam, D] x [D, F] (the MLP's), i.e.
  the speed if every operation ran as such a product and nothing else cost anything.
The exact mode's ratio lines give `ceiling_speedup`: the lower ceiling over HF's measured rate.
"""

import json
import math
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import lmindexer_jax  # noqa: F401  (XLA flags before jax starts)
from lmindexer_jax import checkpoint_import
from lmindexer_jax import decoding
from lmindexer_jax import t5
from lmindexer_jax import vocabularies

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "Queries per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed batches per measurement (at least).")
_MIN_QUERIES = flags.DEFINE_integer("min_queries", 16, "Timed queries per measurement (at least).")
_BEAM = flags.DEFINE_integer("beam", 20, "Beams (and returned IDs) per query.")
_NUM_IDS = flags.DEFINE_integer("num_ids", 10_000, "Valid IDs in the trie.")
_CODES = flags.DEFINE_integer("codes", 256, "Codes per position.")
_POSITIONS = flags.DEFINE_integer("positions", 3, "ID positions.")
_QUERY_LENGTH = flags.DEFINE_integer("query_length", 32, "Query tokens.")
_MODES = flags.DEFINE_list("modes", ["full", "restricted"], "Our normalisation modes.")
_HF = flags.DEFINE_bool("hf", True, "Also time Hugging Face generate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, IDs and queries.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for HF (0: torch's default). On a loaded machine "
    "1 thread can be much faster than 2 (OpenMP spinning).")

_BASE_VOCAB = 32100


def _hf_model(vocab_size: int):
  import torch
  import transformers

  torch.manual_seed(_SEED.value)
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
      feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
  return transformers.T5ForConditionalGeneration(config).eval()


def _prefix_allowed_tokens_fn(trie: decoding.Trie, layout: vocabularies.IdLayout):
  """Reference decoder: dict of token prefixes (after the start token) -> allowed tokens."""
  tokens = np.asarray(trie.id_codes) + np.asarray(trie.token_starts)
  allowed: dict[tuple[int, ...], set[int]] = {}
  for row in tokens.tolist():
    for p in range(len(row)):
      allowed.setdefault(tuple(row[:p]), set()).add(row[p])
  allowed_lists = {k: sorted(v) for k, v in allowed.items()}

  def fn(batch_id, sent):
    prefix = tuple(sent.tolist()[1:])
    if prefix in allowed_lists:
      return allowed_lists[prefix]
    start, end = layout.position_range(min(len(prefix), layout.num_positions - 1))
    return list(range(start, end))  # a dead (-inf) beam; any token keeps HF going

  return fn


def _weight_bytes(params, num_positions: int, vocab_size: int, emb_dim: int) -> dict:
  """Bytes of float32 weights one batch must read: encoder once, then per step the decoder
  (less the cross-attention keys/values, projected once per query) and the full head."""
  import jax

  sizes = {"encoder": 0, "decoder_step": 0, "cross_kv": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = jax.tree_util.keystr(path)
    if keys.startswith("['encoder']"):
      sizes["encoder"] += leaf.size * 4
    elif keys.startswith("['decoder']"):
      cross_kv = "encoder_decoder_attention" in keys and ("'key'" in keys or "'value'" in keys)
      sizes["cross_kv" if cross_kv else "decoder_step"] += leaf.size * 4
  head = vocab_size * emb_dim * 4
  return {"per_batch": sizes["encoder"] + sizes["cross_kv"]
                       + num_positions * (sizes["decoder_step"] + head), **sizes, "head": head}


def _matmul_seconds(rows: int, inner: int, cols: int, trials: int = 3) -> float:
  """Seconds per float32 [rows, inner] x [inner, cols] product on this machine (cols >=
  inner), the best of `trials`. Each trial chains ~20 GFLOP of products (at least 3) inside
  one jitted loop, each reading the last one's first `inner` columns, so Python's dispatch of
  a call is not counted."""
  if cols < inner:
    raise ValueError(f"chained products need cols >= inner, got {cols} < {inner}")
  import jax
  import jax.numpy as jnp

  repeats = max(3, int(2e10 / (2 * rows * inner * cols)))
  w_IxC = jax.random.normal(jax.random.PRNGKey(0), (inner, cols), jnp.float32) * inner**-0.5
  x_RxI = jnp.ones((rows, inner), jnp.float32)

  @jax.jit
  def chain(x_RxI, w_IxC):
    return jax.lax.fori_loop(0, repeats, lambda _, x: (x @ w_IxC)[:, :inner], x_RxI)

  jax.block_until_ready(chain(x_RxI, w_IxC))
  best = math.inf
  for _ in range(trials):
    start = time.perf_counter()
    jax.block_until_ready(chain(x_RxI, w_IxC))
    best = min(best, time.perf_counter() - start)
  return best / repeats


def _streaming_gb_per_s(emb_dim: int, vocab_size: int) -> float:
  """GB/s of a [1, D] x [D, V] product (the head's shape at batch 1): XLA:CPU's rate of
  streaming weights on this machine."""
  return emb_dim * vocab_size * 4 / _matmul_seconds(1, emb_dim, vocab_size) / 1e9


def _matmul_gflop_per_s(rows: int, inner: int, cols: int) -> float:
  """GFLOP/s of float32 [rows, inner] x [inner, cols] products on this machine."""
  return 2 * rows * inner * cols / _matmul_seconds(rows, inner, cols) / 1e9


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def main(argv):
  del argv
  import jax
  import torch

  if _TORCH_THREADS.value:
    torch.set_num_threads(_TORCH_THREADS.value)
  rng = np.random.default_rng(_SEED.value)
  positions, codes = _POSITIONS.value, _CODES.value
  layout = vocabularies.IdLayout(_BASE_VOCAB, (codes,) * positions)
  flat = rng.choice(codes**positions, _NUM_IDS.value, replace=False)
  id_codes = np.stack(np.unravel_index(flat, (codes,) * positions), axis=1)
  trie = decoding.Trie.from_codes(id_codes, layout)
  beam = _BEAM.value
  hf_model = _hf_model(layout.vocab_size)
  with tempfile.TemporaryDirectory() as folder:
    hf_model.save_pretrained(folder)
    cfg, params = checkpoint_import.load_checkpoint(folder)
  module = t5.Transformer(cfg)
  decoders = {mode: decoding.IdDecoder(module, params, trie, beam_size=beam, num_return=beam,
                                       normalization=mode) for mode in _MODES.value}
  prefix_fn = _prefix_allowed_tokens_fn(trie, layout)
  _emit({"setup": "decode_throughput", "num_ids": trie.num_ids, "trie_nodes": trie.num_nodes,
         "max_degree": trie.max_degree, "vocab_size": cfg.vocab_size, "beam": beam,
         "query_length": _QUERY_LENGTH.value, "devices": jax.device_count(),
         "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "load_average_1min": round(os.getloadavg()[0], 2)})

  weights = _weight_bytes(params, positions, cfg.vocab_size, cfg.emb_dim)
  gb_per_s = _streaming_gb_per_s(cfg.emb_dim, cfg.vocab_size)

  def queries(batch: int) -> np.ndarray:
    q = rng.integers(2, _BASE_VOCAB, size=(batch, _QUERY_LENGTH.value)).astype(np.int32)
    q[:, -1] = 1  # EOS
    return q

  def ours(q, mode):
    return jax.block_until_ready(decoders[mode](q))

  def hf(q):
    with torch.no_grad():
      out = hf_model.generate(
          input_ids=torch.tensor(q, dtype=torch.long),
          attention_mask=torch.tensor(q > 0, dtype=torch.long), num_beams=beam,
          num_return_sequences=beam, max_new_tokens=positions, length_penalty=0.0,
          do_sample=False, prefix_allowed_tokens_fn=prefix_fn, output_scores=True,
          return_dict_in_generate=True)
    codes_BxRxC = out.sequences.numpy()[:, 1:].reshape(len(q), beam, positions)
    return codes_BxRxC - np.asarray(trie.token_starts), out.sequences_scores.numpy()

  for batch in (int(b) for b in _BATCH_SIZES.value):
    streaming_qps = batch * gb_per_s * 1e9 / weights["per_batch"]
    _emit({"ceiling": "weight_streaming", "batch": batch,
           "weight_mb_per_batch": round(weights["per_batch"] / 1e6, 1),
           "head_mb": round(weights["head"] / 1e6, 1), "matvec_gb_per_s": round(gb_per_s, 2),
           "max_queries_per_s": round(streaming_qps, 2)})
    num_batches = max(_REPEATS.value, math.ceil(_MIN_QUERIES.value / batch))
    batches = [queries(batch) for _ in range(num_batches)]
    rates = {}
    first = {}
    for mode in _MODES.value:
      start = time.perf_counter()
      ours(queries(batch), mode)  # compiles
      warmup_s = time.perf_counter() - start
      start = time.perf_counter()
      for i, q in enumerate(batches):
        result = ours(q, mode)
        if i == 0:
          first[mode] = result
      seconds = time.perf_counter() - start
      rates[mode] = batch * num_batches / seconds
      _emit({"impl": "ours", "mode": mode, "batch": batch, "beam": beam,
             "queries_per_s": round(rates[mode], 2),
             "seconds_per_batch": round(seconds / num_batches, 4),
             "warmup_s": round(warmup_s, 2), "batches": num_batches})
    ceiling_qps = streaming_qps
    if "full" in decoders:  # After the timing: lowering for the FLOP count compiles too.
      gflop = decoders["full"].cost_analysis(batches[0])["flops"] / batch / 1e9
      # The head's share: every decoder row (1 per query, then `beam`) times [D, V].
      head_gflop = 2 * cfg.emb_dim * cfg.vocab_size * (1 + (positions - 1) * beam) / 1e9
      head_rate = _matmul_gflop_per_s(batch * beam, cfg.emb_dim, cfg.vocab_size)
      mlp_rate = _matmul_gflop_per_s(batch * beam, cfg.emb_dim, cfg.mlp_dim)
      flops_qps = 1 / (head_gflop / head_rate + (gflop - head_gflop) / mlp_rate)
      ceiling_qps = min(ceiling_qps, flops_qps)
      _emit({"ceiling": "flops", "batch": batch, "gflop_per_query": round(gflop, 3),
             "head_gflop_per_query": round(head_gflop, 3),
             "head_gflop_per_s": round(head_rate, 1), "mlp_gflop_per_s": round(mlp_rate, 1),
             "max_queries_per_s": round(flops_qps, 2)})
    if not _HF.value:
      continue
    hf(queries(batch))  # warm-up
    start = time.perf_counter()
    for i, q in enumerate(batches):
      hf_out = hf(q)
      if i == 0:
        hf_first = hf_out
    seconds = time.perf_counter() - start
    hf_rate = batch * num_batches / seconds
    record = {"impl": "hf_generate", "mode": "full", "batch": batch, "beam": beam,
              "queries_per_s": round(hf_rate, 2),
              "seconds_per_batch": round(seconds / num_batches, 4), "batches": num_batches}
    if "full" in first:
      ours_codes = np.asarray(first["full"].codes)
      record["top1_agreement"] = float(np.mean(
          (ours_codes[:, 0] == hf_first[0][:, 0]).all(axis=-1)))
      record["top1_max_score_diff"] = float(np.max(np.abs(
          np.asarray(first["full"].scores)[:, 0] - hf_first[1].reshape(batch, beam)[:, 0])))
    record["load_average_1min"] = round(os.getloadavg()[0], 2)
    _emit(record)
    for mode, rate in rates.items():
      record = {"ratio": f"ours_{mode}/hf_generate", "batch": batch,
                "speedup": round(rate / hf_rate, 2)}
      if mode == "full":  # The ceilings bound exact decoding.
        record["ceiling_speedup"] = round(ceiling_qps / hf_rate, 2)
      _emit(record)


if __name__ == "__main__":
  app.run(main)
