"""Error paths of the HF T5 importer, its command line, and vocabulary extension."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from lmindexer_jax import checkpoint_import
from lmindexer_jax import t5

jax.config.update("jax_numpy_rank_promotion", "raise")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# d_model 16, 2 heads of 8: q.weight is [16, 16], wo.weight [16, 32].
_HF_CONFIG = dict(model_type="t5", vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                  num_decoder_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20, dropout_rate=0.0)
_Q = "encoder.block.1.layer.0.SelfAttention.q.weight"
_WO = "decoder.block.0.layer.2.DenseReluDense.wo.weight"


def _hf_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A complete random T5 v1.1 state dict in HF naming (built by hand: no torch needed)."""
  D, HK, F, V, R, H = 16, 16, 32, 50, 8, 2
  shapes = {"shared.weight": (V, D), "lm_head.weight": (V, D)}
  attention = {"q": (HK, D), "k": (HK, D), "v": (HK, D), "o": (D, HK)}
  mlp = {"wi_0": (F, D), "wi_1": (F, D), "wo": (D, F)}
  for stack, layers, blocks in (("encoder", 2, ("SelfAttention",)),
                                ("decoder", 1, ("SelfAttention", "EncDecAttention"))):
    shapes[f"{stack}.final_layer_norm.weight"] = (D,)
    shapes[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (R, H)
    for i in range(layers):
      for j, block in enumerate(blocks):
        shapes[f"{stack}.block.{i}.layer.{j}.layer_norm.weight"] = (D,)
        for name, shape in attention.items():
          shapes[f"{stack}.block.{i}.layer.{j}.{block}.{name}.weight"] = shape
      j = len(blocks)
      shapes[f"{stack}.block.{i}.layer.{j}.layer_norm.weight"] = (D,)
      for name, shape in mlp.items():
        shapes[f"{stack}.block.{i}.layer.{j}.DenseReluDense.{name}.weight"] = shape
  return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def _write_folder(path, tensors, config=None) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config or _HF_CONFIG, f)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


@pytest.fixture
def good_dir(tmp_path):
  return _write_folder(tmp_path / "good", _hf_tensors(np.random.default_rng(0)))


def test_good_folder_imports(good_dir):
  cfg, params = checkpoint_import.load_checkpoint(good_dir)
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.relative_attention_num_buckets) == (
      2, 1, 8)
  assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
  tensors = load_file(os.path.join(good_dir, "model.safetensors"))
  q_DxHxK = params["encoder"]["layers_1"]["attention"]["query"]["kernel"]
  np.testing.assert_array_equal(q_DxHxK.reshape(16, 16).T, tensors[_Q])
  np.testing.assert_array_equal(params["logits_dense"]["kernel"].T, tensors["lm_head.weight"])


def test_wrong_shape_names_tensor_both_shapes_and_folder(good_dir, tmp_path):
  tensors = load_file(os.path.join(good_dir, "model.safetensors"))
  tensors[_Q] = tensors[_Q][:, :8].copy()
  bad_dir = _write_folder(tmp_path / "wrong_shape", tensors)
  with pytest.raises(checkpoint_import.CheckpointImportError) as error:
    checkpoint_import.load_checkpoint(bad_dir)
  message = str(error.value)
  assert _Q in message and "expected (16, 16)" in message and "found (16, 8)" in message
  assert bad_dir in message and "\n" not in message


def test_missing_tensor_names_tensor_shape_and_folder(good_dir, tmp_path):
  tensors = load_file(os.path.join(good_dir, "model.safetensors"))
  del tensors[_WO]
  bad_dir = _write_folder(tmp_path / "missing", tensors)
  with pytest.raises(checkpoint_import.CheckpointImportError,
                     match=rf"{bad_dir}: tensor '{_WO}' is missing \(expected shape \(16, 32\)\)"):
    checkpoint_import.load_checkpoint(bad_dir)


def test_unexpected_tensors_are_listed_but_tied_copies_are_accepted(good_dir, tmp_path):
  tensors = load_file(os.path.join(good_dir, "model.safetensors"))
  copies = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"]})
  checkpoint_import.load_checkpoint(_write_folder(tmp_path / "copies", copies))
  extra = dict(tensors, **{"encoder.block.7.layer.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(checkpoint_import.CheckpointImportError,
                     match="unexpected tensors: encoder.block.7.layer.0.extra.weight"):
    checkpoint_import.load_checkpoint(_write_folder(tmp_path / "extra", extra))
  different = dict(tensors, **{"decoder.embed_tokens.weight": tensors["lm_head.weight"]})
  with pytest.raises(checkpoint_import.CheckpointImportError, match="differs from 'shared"):
    checkpoint_import.load_checkpoint(_write_folder(tmp_path / "different", different))


def test_unsupported_architecture_and_missing_files(good_dir, tmp_path):
  tensors = load_file(os.path.join(good_dir, "model.safetensors"))
  umt5 = _write_folder(tmp_path / "umt5", tensors, dict(_HF_CONFIG, model_type="umt5"))
  with pytest.raises(checkpoint_import.CheckpointImportError, match="umt5"):
    checkpoint_import.load_checkpoint(umt5)
  os.remove(os.path.join(umt5, "model.safetensors"))
  with pytest.raises(checkpoint_import.CheckpointImportError, match="no model.safetensors"):
    checkpoint_import.load_checkpoint(umt5)
  with pytest.raises(checkpoint_import.CheckpointImportError, match="no spiece.model"):
    checkpoint_import.load_vocabulary(good_dir)


def test_command_line_error_is_one_line_and_nonzero(good_dir, tmp_path):
  bad_dir = str(tmp_path / "bad")
  shutil.copytree(good_dir, bad_dir)
  tensors = load_file(os.path.join(bad_dir, "model.safetensors"))
  tensors[_Q] = tensors[_Q][:8].copy()
  save_file(tensors, os.path.join(bad_dir, "model.safetensors"))
  result = subprocess.run(
      [sys.executable, "-m", "lmindexer_jax.checkpoint_import", f"--hf_dir={bad_dir}"],
      capture_output=True, text=True, cwd=_REPO, timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and _Q in lines[0] and "found (8, 16)" in lines[0], result.stderr


def test_command_line_writes_npz(good_dir, tmp_path, capsys):
  output = str(tmp_path / "params.npz")
  assert checkpoint_import.main([f"--hf_dir={good_dir}", f"--output={output}"]) == 0
  assert "parameters: " in capsys.readouterr().out
  with np.load(output) as saved:
    assert saved["logits_dense/kernel"].shape == (16, 50)
    assert "encoder/layers_1/attention/query/kernel" in saved


def _random_params(cfg: t5.T5Config, tokens: np.ndarray) -> dict:
  """Random params of the model's tree (numpy: compiling the initialisers costs seconds)."""
  abstract = jax.eval_shape(lambda: t5.Transformer(cfg).init(
      jax.random.key(0), tokens, tokens, enable_dropout=False))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.normal(scale=0.2, size=x.shape).astype(np.float32),
                      nn.unbox(abstract["params"]))


@pytest.mark.parametrize("logits_via_embedding", [True, False])
def test_extend_vocab_keeps_rows_and_old_logits(logits_via_embedding):
  cfg = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=2, num_encoder_layers=2,
                    num_decoder_layers=2, head_dim=16, mlp_dim=64, dropout_rate=0.0,
                    logits_via_embedding=logits_via_embedding)
  tokens = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]], np.int32)
  params = _random_params(cfg, tokens)
  extended = checkpoint_import.extend_vocab(params, 1000, jax.random.key(1))
  embedding = extended["token_embedder"]["embedding"]
  assert embedding.shape == (1000, 32)
  np.testing.assert_array_equal(embedding[:64], params["token_embedder"]["embedding"])
  assert abs(float(np.std(embedding[64:])) - 1.0) < 0.05  # the model's N(0, 1) init
  if not logits_via_embedding:
    kernel = extended["logits_dense"]["kernel"]
    assert kernel.shape == (32, 1000)
    np.testing.assert_array_equal(kernel[:, :64], params["logits_dense"]["kernel"])
    assert abs(float(np.std(kernel[:, 64:])) - 32**-0.5) < 0.02  # fan-in init
  logits = t5.Transformer(cfg).apply({"params": params}, tokens, tokens, enable_dropout=False)
  bigger = t5.Transformer(cfg.replace(vocab_size=1000))
  new_logits = bigger.apply({"params": extended}, tokens, tokens, enable_dropout=False)
  np.testing.assert_allclose(new_logits[..., :64], logits, atol=1e-5)
  with pytest.raises(ValueError, match="smaller"):
    checkpoint_import.extend_vocab(params, 10, jax.random.key(1))
