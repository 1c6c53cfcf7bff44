"""Bad input on the command line ends with one clear error line, non-zero, nothing written."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import xla_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train(*args: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
  env = xla_env.env()  # One CPU device.
  return subprocess.run(
      [sys.executable, "-m", "lmindexer_jax.train", *args],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
  )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
  return [line for line in result.stderr.splitlines() if line.startswith("error:")]


_SMOKE = ["--gin_file=gin/models/t5_tiny.gin", "--gin_file=gin/runs/seq2seq_smoke.gin"]


@pytest.mark.parametrize(
    "gin_text, expected",
    [
        ("train_script.train.total_steps = ((", "bad.gin"),
        ("train_script.train.no_such_argument = 3", "no_such_argument"),
    ],
)
def test_bad_gin_file(tmp_path, gin_text, expected):
  bad = tmp_path / "bad.gin"
  bad.write_text("from __gin__ import dynamic_registration\nimport __main__ as train_script\n"
                 + gin_text + "\n")
  model_dir = tmp_path / "run"
  result = _train(*_SMOKE, f"--gin_file={bad}", f"--gin.MODEL_DIR='{model_dir}'")
  assert result.returncode != 0
  (line,) = _error_lines(result)
  assert expected in line, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not model_dir.exists()


def test_missing_required_macro(tmp_path):
  result = _train(*_SMOKE, cwd=REPO)
  assert result.returncode != 0
  (line,) = _error_lines(result)
  assert "MODEL_DIR" in line and "--gin.MODEL_DIR" in line, line


def test_model_dir_that_is_a_file(tmp_path):
  not_a_dir = tmp_path / "model_dir"
  not_a_dir.write_text("precious")
  result = _train(*_SMOKE, f"--gin.MODEL_DIR='{not_a_dir}'")
  assert result.returncode != 0
  (line,) = _error_lines(result)
  assert "is not a directory" in line and str(not_a_dir) in line
  assert not_a_dir.read_text() == "precious"


def test_runs_from_any_directory(tmp_path):
  """gin/ and tasks/ are installed: `--gin_file=gin/...` resolves outside the repository."""
  model_dir = tmp_path / "m"
  result = _train(*_SMOKE, "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
                  f"--gin.MODEL_DIR='{model_dir}'", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (model_dir / "metrics.jsonl").read_text().count("\n") == 1
  assert "TRAIN_STEPS = 2" in (model_dir / "config.gin").read_text()


def test_hugging_face_folder_with_a_wrong_tensor(tmp_path):
  from safetensors.numpy import save_file

  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps(dict(
      model_type="t5", vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False,
  )))
  save_file({"shared.weight": np.zeros((5, 32), np.float32)}, str(hf_dir / "model.safetensors"))
  model_dir = tmp_path / "run"
  result = _train(*_SMOKE, "--gin_file=gin/runs/init_from_hf.gin", f"--gin.HF_DIR='{hf_dir}'",
                  f"--gin.MODEL_DIR='{model_dir}'")
  assert result.returncode != 0
  (line,) = _error_lines(result)
  assert str(hf_dir) in line and "shared.weight" in line, line
  assert "Traceback" not in result.stderr
  assert not (model_dir / "checkpoints").exists() or not any((model_dir / "checkpoints").iterdir())
