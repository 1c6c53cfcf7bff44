"""The config objects that the lazily built task datasets read (corpus sizes, the ID file).

Tasks are registered at import time but build their data only when a dataset is requested;
they then call `get(ConfigClass)`: the instance passed to `configure`, else `ConfigClass()`.

Gin: library code does not import gin, and gin's dynamic registration does not replace the
module attribute, so a library call `CorpusConfig()` never sees bindings. The entry point hands
the gin-configured instances over once after parsing (`gin_utils.configure_task_settings`), after
which a gin file's `tasks.synthetic.CorpusConfig.num_docs = 1024` takes effect.
"""

from collections.abc import Callable
import contextlib
from typing import Any
from typing import TypeVar

T = TypeVar("T")

# Classes whose instances datasets read; an entry point configures each of them.
CONFIG_CLASSES: list[type] = []
_ACTIVE: dict[type, Any] = {}


def config_class(cls: type[T]) -> type[T]:
  """Class decorator: lists `cls` in CONFIG_CLASSES (no other effect)."""
  if cls not in CONFIG_CLASSES:
    CONFIG_CLASSES.append(cls)
  return cls


def configure(*configs: Any) -> None:
  """Makes each config the active instance of its class."""
  for config in configs:
    _ACTIVE[type(config)] = config


def configure_from(factory: Callable[[type], Any | None]) -> None:
  """`configure(factory(cls))` for every class in CONFIG_CLASSES that `factory` returns."""
  configure(*(c for c in map(factory, CONFIG_CLASSES) if c is not None))


def active() -> tuple[Any, ...]:
  """The configured instances, e.g. for another process: `configure(*active())` there."""
  return tuple(_ACTIVE.values())


def reset() -> None:
  """Back to the defaults (`cls()`) for every class."""
  _ACTIVE.clear()


@contextlib.contextmanager
def configured(*configs: Any):
  """`configure(*configs)` inside the block, restoring what was active before."""
  saved = dict(_ACTIVE)
  configure(*configs)
  try:
    yield
  finally:
    _ACTIVE.clear()
    _ACTIVE.update(saved)


def get(cls: type[T]) -> T:
  """The active instance of `cls`, else its default `cls()`."""
  config = _ACTIVE.get(cls)
  return cls() if config is None else config
