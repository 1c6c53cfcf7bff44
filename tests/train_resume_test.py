"""The trainer resumes exactly: after SIGKILL, and after SIGTERM (which saves and exits 0).

Each run is a real `python -m lmindexer_jax.train` subprocess with the gin files users use.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import xla_env

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 120
PERIOD = 30


def _command(model_dir: pathlib.Path, *extra: str) -> list[str]:
  return [
      sys.executable, "-m", "lmindexer_jax.train",
      "--gin_file=gin/models/t5_tiny.gin",
      "--gin_file=gin/runs/seq2seq_smoke.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={TOTAL_STEPS}",
      "--gin.BATCH_SIZE=8",
      f"--gin.checkpoints.CheckpointConfig.period={PERIOD}",
      "--gin.checkpoints.CheckpointConfig.keep=3",
      "--gin.train.log_period=1",
      *extra,
  ]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_env.flags()  # One CPU device: these test resumption, not sharding.
  return env


def _run(model_dir, *extra) -> subprocess.CompletedProcess:
  return subprocess.run(
      _command(model_dir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
      timeout=600,
  )


def _run_until(model_dir, step: int, sig: int) -> tuple[int, str]:
  """Starts a run, sends `sig` once it has logged `step`, returns (exit code, output)."""
  proc = subprocess.Popen(
      _command(model_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
  )
  lines = []
  for line in proc.stdout:
    lines.append(line)
    match = re.match(r"\[train\] step (\d+)/", line)
    # Orbax saves asynchronously: wait until the checkpoint before `step` is on disk.
    if match and int(match[1]) >= step and _checkpoint_steps(model_dir):
      proc.send_signal(sig)
      break
  lines.extend(proc.stdout)
  return proc.wait(timeout=300), "".join(lines)


def _final_params(model_dir: pathlib.Path) -> dict:
  path = model_dir / "checkpoints" / str(TOTAL_STEPS) / "state"
  return ocp.StandardCheckpointer().restore(path)["params"]


def _checkpoint_steps(model_dir: pathlib.Path) -> list[int]:
  directory = model_dir / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("straight")
  result = _run(model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


def test_straight_run_learns_and_logs(straight_run):
  records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
  losses = [r["loss"] for r in records]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  for key in ("learning_rate", "steps_per_s", "tokens_per_s", "accuracy"):
    assert key in records[-1]
  assert (straight_run / "config.gin").read_text().count("train_script.train") >= 1
  assert list((straight_run / "tensorboard").iterdir())
  assert _checkpoint_steps(straight_run) == [60, 90, 120]  # keep=3


def test_sigkill_then_sigterm_then_resume_equals_straight_run(straight_run, tmp_path):
  model_dir = tmp_path / "interrupted"
  # 1. Killed without warning mid-way: the last finished checkpoint survives.
  code, out = _run_until(model_dir, PERIOD + 1, signal.SIGKILL)
  assert code == -signal.SIGKILL, out[-2000:]
  killed_at = _checkpoint_steps(model_dir)[-1]
  assert killed_at < TOTAL_STEPS
  # 2. Resumed, then preempted with SIGTERM: it saves at the next step boundary and exits 0.
  code, out = _run_until(model_dir, killed_at + 10, signal.SIGTERM)
  assert code == 0, out[-3000:]
  assert f"resumed from step {killed_at}" in out, out[-3000:]
  preempted_at = _checkpoint_steps(model_dir)[-1]
  assert killed_at + 10 <= preempted_at < TOTAL_STEPS
  assert "SIGTERM: saved a checkpoint" in out
  # 3. Resumed to the end.
  result = _run(model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {preempted_at}" in result.stderr + result.stdout

  logged = (model_dir / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in logged]
  assert steps == list(range(1, TOTAL_STEPS + 1))  # No step lost or logged twice.
  ours, reference = _final_params(model_dir), _final_params(straight_run)
  for path, a in _flatten(ours).items():
    np.testing.assert_allclose(a, _flatten(reference)[path], rtol=0, atol=1e-6, err_msg=path)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}
