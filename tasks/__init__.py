"""seqio tasks and mixtures of lmindexer_jax, registered on import (`import tasks`).

`lmindexer.synthetic.*` is the embedded corpus's task family (`tasks.synthetic`); other
datasets register theirs with `register_corpus_tasks`. Dataset settings (corpus sizes, the ID
file) are read lazily from `tasks.settings`.
"""

from tasks import real  # noqa: F401
from tasks import settings  # noqa: F401
from tasks import smoke  # noqa: F401
from tasks import synthetic
from tasks.registration import register_corpus_tasks

SYNTHETIC_TASKS = register_corpus_tasks("synthetic", synthetic.corpus_source)
