"""lmindexer_jax: LMIndexer (Language Models As Semantic Indexers) in JAX/Flax."""

__version__ = "0.1.0"
