"""Atomic file writes: readers, and a run resumed after a kill, see the old file or the new one.

Each writer fills a uniquely named temporary file beside the target, flushes it to disk and
renames it over the target (`os.replace`, atomic within a file system). A write that fails or
is killed leaves the target as it was; a failed one removes its temporary file. Files get the
usual permissions (the process umask), unlike `tempfile`'s private 0600.
"""

from collections.abc import Iterator
import contextlib
import json
import os
import secrets
from typing import IO
from typing import Any

import numpy as np


@contextlib.contextmanager
def _replacing(path: str, mode: str) -> Iterator[IO]:
  """Yields a file open in `mode` ('w' or 'wb') that replaces `path` if the block succeeds."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
  try:
    with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else "utf-8") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> str:
  """Writes `text` (UTF-8) to `path`; returns `path`."""
  with _replacing(path, "w") as f:
    f.write(text)
  return path


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path`; returns `path`."""
  with _replacing(path, "wb") as f:
    f.write(data)
  return path


def write_json(path: str, value: Any) -> str:
  """Writes `value` as indented JSON (one newline at the end); returns `path`."""
  return write_text(path, json.dumps(value, indent=1) + "\n")


def save_array(path: str, array: np.ndarray) -> str:
  """`np.save`s `array` to `path` (give it the .npy suffix); returns `path`."""
  with _replacing(path, "wb") as f:
    np.save(f, np.asarray(array))
  return path
