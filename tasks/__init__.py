"""seqio tasks and mixtures of lmindexer_jax, registered on import (`import tasks`)."""
from tasks import smoke  # noqa: F401
