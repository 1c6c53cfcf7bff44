"""Atomic writes: the target is replaced whole or left alone, with the usual permissions."""

import json
import os

import numpy as np
import pytest

from lmindexer_jax import files


def test_writes_create_directories_and_replace_the_target(tmp_path):
  path = str(tmp_path / "a" / "b" / "stats.json")
  assert files.write_json(path, {"x": 1}) == path
  assert files.write_json(path, {"x": [1, 2]}) == path
  with open(path) as f:
    text = f.read()
  assert json.loads(text) == {"x": [1, 2]} and text.endswith("]\n}\n")
  files.write_text(str(tmp_path / "t.txt"), "héllo\n")
  assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
  files.write_bytes(str(tmp_path / "b.bin"), b"\x00\x01")
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  array = np.arange(6, dtype=np.int32).reshape(2, 3)
  files.save_array(str(tmp_path / "codes.npy"), array)
  np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), array)
  assert sorted(os.listdir(tmp_path)) == ["a", "b.bin", "codes.npy", "t.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "semantic_ids.tsv"
  files.write_text(str(path), "old\n")
  with pytest.raises(TypeError):
    files.write_text(str(path), 12345)  # Fails inside the write.
  with pytest.raises(RuntimeError):
    with files._replacing(str(path), "w") as f:  # pylint: disable=protected-access
      f.write("half a file")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old\n"
  assert os.listdir(tmp_path) == ["semantic_ids.tsv"]


def test_files_get_the_umask_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_text(str(tmp_path / "x.txt"), "x")
  finally:
    os.umask(old)
  assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644
