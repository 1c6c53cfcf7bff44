"""lmindexer_jax: LMIndexer (Language Models As Semantic Indexers) in JAX/Flax."""

import os

# TensorFlow (seqio's input pipeline) logs start-up details from C++ at INFO; keep terminals to
# our progress lines unless the user asked otherwise. Must precede importing TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# jaxlib 0.10.2's XLA:CPU YNNPACK fusion computes some jitted reductions wrongly, silently
# (jax-ml/jax#39103; e.g. `c * x.sum(1)[None, :, None] + jnp.sum(x[None] * c, 2)[..., None]`
# for c [448, 28, 16] is off by ~20). Switch the fusion off; must precede JAX's backend start.
_NO_YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type="
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_YNN_FUSION}".strip()

__version__ = "0.1.0"
