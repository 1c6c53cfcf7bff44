"""lmindexer_jax: LMIndexer (Language Models As Semantic Indexers) in JAX/Flax."""

import os

# TensorFlow (seqio's input pipeline) logs start-up details from C++ at INFO; keep terminals to
# our progress lines unless the user asked otherwise. Must precede importing TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
