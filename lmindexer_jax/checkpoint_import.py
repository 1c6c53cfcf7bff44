"""Imports a local Hugging Face T5 folder into `t5.Transformer` parameters.

A folder holds `config.json`, the weights (`model.safetensors`, `pytorch_model.bin`, or a
sharded `*.index.json` of either) and usually `spiece.model`. Every tensor is checked against
the shape the config implies; problems are reported together in one `CheckpointImportError`.

The LM head follows HF 5.x: the config's `scale_decoder_outputs` (or, in older configs,
`tie_word_embeddings`) says whether the decoder output is rescaled by d_model**-0.5, and a head is
untied only when `lm_head.weight` is present and differs from `shared.weight`.

    python -m lmindexer_jax.checkpoint_import --hf_dir=/path/to/t5-base [--output=params.npz]

Shape letters: D d_model, H heads, K d_kv, F d_ff, V vocab, R relative-position buckets.
"""

import argparse
from collections.abc import Mapping
import json
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 safetensors load)
import numpy as np
from safetensors import safe_open

from lmindexer_jax import t5

# HF ties these to `shared.weight`; a checkpoint may still store them (e.g. `.bin` state dicts).
_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# HF never uses this (only the first self-attention has a relative bias) and ignores it on load.
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# HF `feed_forward_proj` activations (`gated-gelu` means `gelu_new`) -> `t5._ACTIVATIONS` names.
_HF_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "silu": "silu", "swish": "silu"}


class CheckpointImportError(ValueError):
  """A Hugging Face T5 folder that cannot be imported; the message names folder and tensors."""


def config_from_hf(hf_config: Mapping[str, Any], *, logits_via_embedding: bool,
                   dtype: Any = jnp.float32) -> t5.T5Config:
  """Builds a `T5Config` from the fields of an HF T5 `config.json`.

  Args:
    hf_config: the parsed `config.json`.
    logits_via_embedding: tied, rescaled head (decided by `load_checkpoint` from the tensors).
    dtype: compute dtype of the model.

  Returns:
    The config; raises `CheckpointImportError` for an unsupported architecture.
  """
  model_type = hf_config.get("model_type", "t5")
  if model_type not in ("t5", "mt5"):
    raise CheckpointImportError(f"model_type {model_type!r} is not T5 (expected 't5' or 'mt5').")
  projection = hf_config.get("feed_forward_proj", "relu")
  parts = projection.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  hf_activation = "gelu_new" if projection == "gated-gelu" else parts[-1]
  if hf_activation not in _HF_ACTIVATIONS or not (gated or len(parts) == 1):
    raise CheckpointImportError(f"feed_forward_proj {projection!r} is not supported.")
  activation = _HF_ACTIVATIONS[hf_activation]
  num_layers = hf_config.get("num_layers", 6)
  return t5.T5Config(
      vocab_size=hf_config.get("vocab_size", 32128),
      emb_dim=hf_config.get("d_model", 512),
      num_heads=hf_config.get("num_heads", 8),
      num_encoder_layers=num_layers,
      num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
      head_dim=hf_config.get("d_kv", 64),
      mlp_dim=hf_config.get("d_ff", 2048),
      mlp_activations=(activation, "linear") if gated else (activation,),
      dropout_rate=hf_config.get("dropout_rate", 0.1),
      dtype=dtype,
      logits_via_embedding=logits_via_embedding,
      relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
  )


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T  # HF Linear weights are [out, in].


def _tensor_map(cfg: t5.T5Config):
  """(HF name, our param path, expected HF shape, HF -> ours) for every tensor but the head."""
  D, H, K, F, V, R = (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size,
                      cfg.relative_attention_num_buckets)
  entries = [("shared.weight", ("token_embedder", "embedding"), (V, D), _identity)]

  def layer_norm(hf_name, path):
    entries.append((hf_name, (*path, "scale"), (D,), _identity))

  def attention(hf_prefix, path):
    for hf_name, name in (("q", "query"), ("k", "key"), ("v", "value")):
      # [H*K, D] -> [D, H, K]
      entries.append((f"{hf_prefix}.{hf_name}.weight", (*path, name, "kernel"), (H * K, D),
                      lambda w: w.T.reshape(D, H, K)))
    # [D, H*K] -> [H, K, D]
    entries.append((f"{hf_prefix}.o.weight", (*path, "out", "kernel"), (D, H * K),
                    lambda w: w.T.reshape(H, K, D)))

  def mlp(hf_prefix, path):
    names = ["wi"] if len(cfg.mlp_activations) == 1 else [
        f"wi_{i}" for i in range(len(cfg.mlp_activations))]
    for name in names:
      entries.append((f"{hf_prefix}.{name}.weight", (*path, name, "kernel"), (F, D), _transpose))
    entries.append((f"{hf_prefix}.wo.weight", (*path, "wo", "kernel"), (D, F), _transpose))

  for stack, num_layers in (("encoder", cfg.num_encoder_layers),
                            ("decoder", cfg.num_decoder_layers)):
    entries.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    (stack, "relpos_bias", "rel_embedding"), (R, H), _transpose))
    for i in range(num_layers):
      hf, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      if stack == "encoder":
        layer_norm(f"{hf}.0.layer_norm.weight", (*ours, "pre_attention_layer_norm"))
        attention(f"{hf}.0.SelfAttention", (*ours, "attention"))
        mlp_index = 1
      else:
        layer_norm(f"{hf}.0.layer_norm.weight", (*ours, "pre_self_attention_layer_norm"))
        attention(f"{hf}.0.SelfAttention", (*ours, "self_attention"))
        layer_norm(f"{hf}.1.layer_norm.weight", (*ours, "pre_cross_attention_layer_norm"))
        attention(f"{hf}.1.EncDecAttention", (*ours, "encoder_decoder_attention"))
        mlp_index = 2
      layer_norm(f"{hf}.{mlp_index}.layer_norm.weight", (*ours, "pre_mlp_layer_norm"))
      mlp(f"{hf}.{mlp_index}.DenseReluDense", (*ours, "mlp"))
    norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
    layer_norm(f"{stack}.final_layer_norm.weight", (stack, norm))
  return entries


def _read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of the folder's weights as float32 numpy arrays, by HF name."""
  weight_files = []
  for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                  ("pytorch_model.bin.index.json", "pytorch_model.bin")):
    index_path = os.path.join(hf_dir, index_name)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_files = sorted(set(json.load(f)["weight_map"].values()))
      break
    if os.path.exists(os.path.join(hf_dir, single_name)):
      weight_files = [single_name]
      break
  if not weight_files:
    raise CheckpointImportError(
        f"{hf_dir}: no model.safetensors or pytorch_model.bin (or sharded index) found.")
  tensors = {}
  for name in weight_files:
    path = os.path.join(hf_dir, name)
    if name.endswith(".safetensors"):
      with safe_open(path, framework="np") as f:
        for key in f.keys():
          tensors[key] = np.asarray(f.get_tensor(key), np.float32)
    else:
      import torch  # Only `.bin` checkpoints need torch.

      state = torch.load(path, map_location="cpu", weights_only=True)
      for key, value in state.items():
        tensors[key] = value.detach().to(torch.float32).numpy()
  return tensors


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def load_checkpoint(hf_dir: str, dtype: Any = jnp.float32) -> tuple[t5.T5Config, dict]:
  """Reads an HF T5 folder into a `T5Config` and `Transformer` params.

  Args:
    hf_dir: folder with `config.json` and the weights.
    dtype: compute dtype for the returned config (parameters are always float32).

  Returns:
    (config, params): params is the nested dict `Transformer(config).init(...)['params']` has
    (unboxed), with float32 numpy leaves.

  Raises:
    CheckpointImportError: the config is missing or not T5, or tensors are missing, have the
      wrong shape, or are unexpected; one error lists every problem.
  """
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointImportError(f"{hf_dir}: no config.json.")
  with open(config_path) as f:
    hf_config = json.load(f)
  tensors = _read_tensors(hf_dir)
  if "shared.weight" not in tensors:  # e.g. saved from a model whose shared table was renamed
    for copy in _EMBEDDING_COPIES:
      if copy in tensors:
        tensors["shared.weight"] = tensors[copy]
        break

  # The head: HF rescales by d_model**-0.5 iff `scale_decoder_outputs` (5.x) or, in older
  # configs, `tie_word_embeddings`; it unties only for a stored `lm_head.weight` != shared.
  scale = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
  shared, lm_head = tensors.get("shared.weight"), tensors.get("lm_head.weight")
  separate_head = (lm_head is not None and shared is not None and
                   (lm_head.shape != shared.shape or not np.array_equal(lm_head, shared)))
  cfg = config_from_hf(hf_config, logits_via_embedding=bool(scale) and not separate_head,
                       dtype=dtype)

  entries = _tensor_map(cfg)
  if not cfg.logits_via_embedding:
    if separate_head:
      # A separate head with the rescale (unusual) folds the rescale into the kernel.
      factor = cfg.emb_dim**-0.5 if scale else 1.0
      entries.append(("lm_head.weight", ("logits_dense", "kernel"),
                      (cfg.vocab_size, cfg.emb_dim), lambda w: w.T * np.float32(factor)))
    else:
      # Tied but not rescaled (T5 v1.1 saved by HF 5.x): the head starts as a copy of shared.
      entries.append(("shared.weight", ("logits_dense", "kernel"),
                      (cfg.vocab_size, cfg.emb_dim), _transpose))

  problems = []
  params: dict = {}
  for hf_name, path, expected, convert in entries:
    if hf_name not in tensors:
      problems.append(f"tensor '{hf_name}' is missing (expected shape {expected})")
    elif _shape(tensors[hf_name]) != expected:
      problems.append(f"tensor '{hf_name}' has the wrong shape: expected {expected}, "
                      f"found {_shape(tensors[hf_name])}")
    else:
      _set(params, path, np.ascontiguousarray(convert(tensors[hf_name]), np.float32))
  used = {hf_name for hf_name, *_ in entries} | {"lm_head.weight"} | set(_IGNORED)
  for copy in _EMBEDDING_COPIES:
    if copy in tensors:
      used.add(copy)
      if shared is not None and not np.array_equal(tensors[copy], shared):
        problems.append(f"tensor '{copy}' differs from 'shared.weight' (HF ties them)")
  unexpected = sorted(set(tensors) - used)
  if unexpected:
    problems.append(f"unexpected tensors: {', '.join(unexpected)}")
  if problems:
    raise CheckpointImportError(f"{hf_dir}: " + "; ".join(problems) + ".")

  # Self-check of this module against t5.py: the tree must be exactly the model's.
  got = jax.tree.map(_shape, params)
  want = jax.tree.map(_shape, _abstract_params(cfg))
  if got != want:
    raise AssertionError(f"Imported parameter tree does not match Transformer: {got} vs {want}")
  return cfg, params


def _abstract_params(cfg: t5.T5Config):
  tokens = jnp.ones((1, 1), jnp.int32)
  # Unboxed while traced: under a caller's mesh (`train`'s init_params_fn) unboxing applies
  # sharding constraints, which shape-only values cannot take.
  return jax.eval_shape(lambda: nn.unbox(t5.Transformer(cfg).init(
      jax.random.key(0), tokens, tokens, enable_dropout=False)["params"]))


def check_params_fit(params: Mapping[str, Any], cfg: t5.T5Config, source: str) -> None:
  """Raises ValueError, naming `source` and the first parameters that differ, unless `params`
  have exactly the shapes of `Transformer(cfg)`'s (e.g. a checkpoint of another architecture)."""
  got = {jax.tree_util.keystr(k): _shape(v) for k, v in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {jax.tree_util.keystr(k): _shape(v) for k, v in
          jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0]}
  differences = [f"{name}: {got.get(name, 'missing')} where the model has "
                 f"{want.get(name, 'none')}"
                 for name in sorted(set(got) | set(want)) if got.get(name) != want.get(name)]
  if differences:
    raise ValueError(f"{source}: the parameters do not fit the model ({cfg}): "
                     + "; ".join(differences[:3])
                     + (f"; and {len(differences) - 3} more" if len(differences) > 3 else ""))


def load_vocabulary(hf_dir: str, extra_ids: int = 100):
  """The folder's `spiece.model` as a seqio vocabulary with T5's `extra_ids` sentinels."""
  path = os.path.join(hf_dir, "spiece.model")
  if not os.path.exists(path):
    raise CheckpointImportError(f"{hf_dir}: no spiece.model.")
  from lmindexer_jax import vocabularies  # seqio pulls in TensorFlow; import it only here.

  return vocabularies.sentencepiece_vocabulary(path, extra_ids=extra_ids)


def extend_vocab(params: Mapping[str, Any], new_vocab_size: int, rng: jax.Array) -> dict:
  """Grows the vocabulary of imported params, e.g. to append semantic-ID code tokens.

  Rows [0, old V) are kept; new rows of the token embedding (and new columns of `logits_dense`
  for an untied head) are drawn from the model's own initialisers. Use the result with
  `config.replace(vocab_size=new_vocab_size)`.

  Args:
    params: `Transformer` params (e.g. from `load_checkpoint`).
    new_vocab_size: the new V; at least the current one.
    rng: PRNG key for the new rows.

  Returns:
    A new params dict (the input is not modified).
  """
  embedding_VxD = params["token_embedder"]["embedding"]
  old_vocab_size, emb_dim = embedding_VxD.shape
  if new_vocab_size < old_vocab_size:
    raise ValueError(f"new_vocab_size ({new_vocab_size}) is smaller than the checkpoint's "
                     f"vocabulary ({old_vocab_size}).")
  added = new_vocab_size - old_vocab_size
  embed_rng, logits_rng = jax.random.split(rng)
  params = dict(params)
  new_rows = t5.EMBEDDING_INIT(embed_rng, (added, emb_dim), jnp.float32)
  params["token_embedder"] = {
      **params["token_embedder"],
      "embedding": jnp.concatenate([jnp.asarray(embedding_VxD), new_rows], axis=0)}
  if "logits_dense" in params:
    kernel_DxV = params["logits_dense"]["kernel"]
    new_cols = t5.dense_init(1, 1)(logits_rng, (emb_dim, added), jnp.float32)
    params["logits_dense"] = {
        **params["logits_dense"],
        "kernel": jnp.concatenate([jnp.asarray(kernel_DxV), new_cols], axis=1)}
  return params


def pretrained_params(hf_dir: str, vocab_size: int | None = None, seed: int = 0) -> dict:
  """A Hugging Face T5 folder's parameters for training, e.g. `train(init_params_fn=...)`.

  With `vocab_size` larger than the checkpoint's (code tokens appended to the base
  vocabulary), the new rows are initialised by `extend_vocab` with `seed`.
  """
  _, params = load_checkpoint(hf_dir)
  if vocab_size is not None:
    params = extend_vocab(params, vocab_size, jax.random.PRNGKey(seed))
  return params


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def main(argv: list[str] | None = None) -> int:
  """Checks an HF T5 folder, prints the config and parameter count, optionally writes .npz."""
  parser = argparse.ArgumentParser(prog="python -m lmindexer_jax.checkpoint_import",
                                   description=main.__doc__)
  parser.add_argument("--hf_dir", required=True, help="Hugging Face T5 folder.")
  parser.add_argument("--output", help="Write the params as .npz, keys like 'encoder/...'.")
  args = parser.parse_args(argv)
  try:
    cfg, params = load_checkpoint(args.hf_dir)
  except CheckpointImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  flat = _flatten(params)
  print(cfg)
  print(f"parameters: {sum(x.size for x in flat.values()):,} in {len(flat)} arrays")
  if args.output:
    np.savez(args.output, **flat)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
