"""Command-line gin for the entry points, as t5x does it.

`--gin_file` (repeatable, composed in order), `--gin.KEY=VALUE` (rewritten to
`--gin_bindings`), `--gin_search_paths`. Gin files bind the entry function as
`train_script.train` after `import __main__ as train_script`. The resolved config is
written to `MODEL_DIR/config.gin`. Only entry points import this module.
"""

from collections.abc import Callable
from collections.abc import Sequence
import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import gin

from lmindexer_jax import files

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files, parsed in order; later files win.")
flags.DEFINE_multi_string("gin_bindings", [], "Individual bindings, applied after the files.")
flags.DEFINE_list(
    "gin_search_paths",
    [],
    "Extra directories for resolving --gin_file and gin `include`s; the current directory and "
    "the installed package's gin files are always searched.",
)
flags.DEFINE_bool("traceback", False, "Print the full traceback of configuration errors.")

# Errors from the user's input (config, paths, files): one line, no traceback.
_USER_ERRORS = (ValueError, OSError, KeyError)


def default_search_paths() -> list[str]:
  """The current directory and the directory holding `gin/`.

  That is the package itself when installed (setup.py ships gin/ as lmindexer_jax/gin) and the
  repository root in a source checkout.
  """
  package_dir = os.path.dirname(os.path.abspath(__file__))
  candidates = [package_dir, os.path.dirname(package_dir)]
  return [os.getcwd()] + [d for d in candidates if os.path.isdir(os.path.join(d, "gin"))]


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`."""
  out = []
  for arg in argv:
    match = re.fullmatch(r"--gin\.([^=]+)=(.*)", arg, flags=re.DOTALL)
    out.append(f"--gin_bindings={match[1]} = {match[2]}" if match else arg)
  return out


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
  """Parses files, then bindings, then finalises; every failure names where it happened."""
  for path in [*search_paths, *default_search_paths()]:
    gin.add_config_file_search_path(path)
  for source, parse_one in [
      *[(f"gin file {f!r}", lambda f=f: gin.parse_config_file(f)) for f in gin_files],
      *[(f"binding {b!r}", lambda b=b: gin.parse_config(b)) for b in bindings],
  ]:
    try:
      parse_one()
    except Exception as e:  # gin raises ValueError, SyntaxError, TokenError, IOError...
      raise ValueError(f"In {source}: {e}") from e
  try:
    gin.finalize()
  except ValueError as e:
    unset = re.search(r"(\S+)/macro\.value set to `%gin\.REQUIRED`", str(e))
    if unset:
      raise ValueError(
          f"Required macro {unset[1]} is not set: pass --gin.{unset[1]}=... or bind it in a "
          "gin file."
      ) from None
    raise


def write_config(model_dir: str) -> None:
  """Writes every binding in force to `model_dir/config.gin` (atomically, process 0)."""
  import jax  # Imported here so that parsing flags stays light.

  if jax.process_index() != 0:
    return
  files.write_text(os.path.join(model_dir, "config.gin"), gin.config_str())


def run(fn: Callable[..., Any], name: str, dispatch: Callable[..., Any]) -> Any:
  """Parses the command line's gin and runs the job it names, `fn` by default.

  `fn` is registered as `__main__.<name>`. A gin file names another job by binding the entry
  module's `dispatch` function (`run` in train.py) to a configurable, e.g. the indexer:

    train_script.run.job = @index_pipeline.index
  """
  default = gin.external_configurable(fn, name=name, module="__main__")
  parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  configure_task_settings()
  model_dir = gin.query_parameter("MODEL_DIR/macro.value") if _has_macro("MODEL_DIR") else None
  if model_dir:
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
      raise NotADirectoryError(f"MODEL_DIR {model_dir!r} exists and is not a directory.")
    write_config(model_dir)
  try:
    job = gin.get_configurable(dispatch)  # Registered only where a gin file binds it.
  except ValueError:
    job = default
  return job()


def configure_task_settings() -> None:
  """Hands gin-bound dataset settings (corpus sizes, the ID file) to the lazy seqio tasks.

  Gin's dynamic registration binds a configurable without replacing the class in its module,
  so the tasks (which never import gin) read the configured instances from `tasks.settings`.
  """
  from tasks import settings

  def from_gin(cls):
    try:
      configurable = gin.get_configurable(cls)
    except ValueError:  # No gin file imports it: the task keeps its default.
      return None
    return configurable()

  settings.configure_from(from_gin)


def _has_macro(name: str) -> bool:
  try:
    gin.query_parameter(f"{name}/macro.value")
    return True
  except ValueError:
    return False


def launch(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with t5x's `--gin.` syntax and one-line errors for bad input."""

  def guarded(argv):
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Progress lines, not every library's INFO log.
    try:
      main(argv)
    except _USER_ERRORS as e:
      if FLAGS.traceback:
        raise
      # gin appends "In call to configurable 'x' (<function ...>)" per level: not for users.
      message = re.sub(r"\s*In call to configurable '[^']*' \(<[^>]*>\)", "", str(e))
      message = " ".join(message.split())
      print(f"error: {type(e).__name__}: {message} (--traceback for details)", file=sys.stderr)
      sys.exit(1)

  app.run(guarded, argv=rewrite_gin_args(sys.argv))
