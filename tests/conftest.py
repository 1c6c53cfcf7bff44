"""Test set-up shared by every test module."""

import os
import tempfile

import xla_env  # tests/ is on the path

# Eight simulated CPU devices, so mesh tests run on any machine, compiled fast (`xla_env`). Must
# precede importing jax.
os.environ.setdefault("XLA_FLAGS", xla_env.flags(num_devices=8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache per test session, shared with the command-line runs the
# tests start: runs of the same configuration (a pipeline, then its kill-and-resume) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lmindexer_jax_cache"))
# Keep tests' trained vocabularies out of the user's cache.
os.environ.setdefault(
    "LMINDEXER_CACHE", os.path.join(tempfile.gettempdir(), "lmindexer_test_cache")
)

import jax  # noqa: E402
import pytest  # noqa: E402

import lmindexer_jax  # noqa: E402, F401  (sets XLA flags before the backend starts)

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def straight_index(tmp_path_factory):
  """One tiny indexer run (gin/runs/index.gin, codebooks (2, 2)) for pipeline and assign tests."""
  import indexer_test  # tests/ is on the path; imported here, when the fixture is first used.

  return indexer_test.run_straight_index(tmp_path_factory.mktemp("index"))
