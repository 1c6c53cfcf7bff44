"""Fine-tuning runs: the three initialisations, the indexer's T5 rows kept exactly, gin runs."""

import json
import os
import pathlib
import shutil
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmindexer_jax import checkpoint_import
from lmindexer_jax import checkpoints
from lmindexer_jax import finetune
from lmindexer_jax import gin_utils
from lmindexer_jax import models
from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import train
from tasks import semantic_ids
from tasks import settings
from tasks import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = synthetic.CorpusConfig(
    num_docs=96, branching=(4, 2, 2), words_per_topic=(8, 6, 4), num_users=24, vocab_size=300
)
TINY_GIN = [
    "--gin.tasks.synthetic.CorpusConfig.num_docs=96",
    "--gin.tasks.synthetic.CorpusConfig.branching=(4, 2, 2)",
    "--gin.tasks.synthetic.CorpusConfig.words_per_topic=(8, 6, 4)",
    "--gin.tasks.synthetic.CorpusConfig.num_users=24",
    "--gin.tasks.synthetic.CorpusConfig.vocab_size=300",
]
CODEBOOKS = (4, 4)
TASK = "lmindexer.synthetic.retrieval_indexing"


@pytest.fixture(scope="module")
def id_file(tmp_path_factory):
  """Random codes over two positions of 4, plus a collision counter."""
  doc_ids = synthetic.build(TINY).doc_ids
  codes = np.random.default_rng(0).integers(0, 4, size=(len(doc_ids), len(CODEBOOKS)))
  codes, size = semantic_ids.append_disambiguation(codes)
  path = str(tmp_path_factory.mktemp("ids") / semantic_ids.FILE_NAME)
  return semantic_ids.write(path, doc_ids, codes, codebook_sizes=CODEBOOKS,
                            disambiguation_size=size)


@pytest.fixture(autouse=True)
def tiny_settings(id_file):
  with settings.configured(TINY, semantic_ids.IdFile(path=id_file)):
    yield


def _tiny_config(vocab_size: int, num_layers: int = 2) -> t5.T5Config:
  """gin/models/t5_tiny.gin's sizes."""
  return t5.T5Config(vocab_size=vocab_size, emb_dim=32, num_heads=2, num_encoder_layers=num_layers,
                     num_decoder_layers=num_layers, head_dim=16, mlp_dim=64,
                     mlp_activations=("gelu", "linear"), logits_via_embedding=False)


def _layout():
  return finetune.task_id_vocabulary(TASK).layout


def _indexer_t5(vocab_size: int, seed: int = 7, num_layers: int = 2) -> dict:
  """What a trained indexer's T5 could hold: distinct values of a trainable scale everywhere."""
  tokens = jnp.ones((1, 1), jnp.int32)
  config = _tiny_config(vocab_size, num_layers)
  shapes = jax.eval_shape(lambda: nn.unbox(t5.Transformer(config).init(
      jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False))["params"])
  rng = np.random.default_rng(seed)

  def value(path, s):
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")  # layer norms
    return (float(is_scale) + rng.normal(scale=0.05, size=s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(value, shapes)


def _assert_starts_from(got: dict, source: dict, shared: int, vocab_size: int) -> None:
  """Every leaf is the source's; the token rows (and head columns) only for [0, shared)."""
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  flat_source = jax.tree_util.tree_flatten_with_path(source)[0]
  assert len(flat_got) == len(flat_source)
  for path, want in flat_source:
    have = np.asarray(flat_got[path])
    name = jax.tree_util.keystr(path)
    if name == "['token_embedder']['embedding']":
      assert have.shape == (vocab_size, want.shape[1])
      np.testing.assert_array_equal(have[:shared], want)
      assert np.isfinite(have[shared:]).all() and have[shared:].std() > 0
    elif name == "['logits_dense']['kernel']":
      assert have.shape == (want.shape[0], vocab_size)
      np.testing.assert_array_equal(have[:, :shared], want)
    else:
      np.testing.assert_array_equal(have, want, err_msg=name)


def test_dataset_task():
  assert finetune.dataset_task("lmindexer.nq320k.index", "retrieval_indexing") == (
      "lmindexer.nq320k.retrieval_indexing")
  with pytest.raises(ValueError, match="is not a"):
    finetune.dataset_task("lmindexer.nq320k.retrieval", "search")


def test_init_from_a_saved_indexer_t5(tmp_path):
  layout = _layout()
  assert layout.disambiguation_size > 1 and layout.codebook_sizes == CODEBOOKS
  shared = layout.vocab_size - layout.disambiguation_size  # base + code tokens
  source = _indexer_t5(shared)
  finetune.save_indexer_t5(str(tmp_path / "index"), source)
  config = finetune.task_model_config(_tiny_config(0), TASK)
  assert config.vocab_size == layout.vocab_size
  got = finetune.initial_params(init="indexer", t5_config=config, task_name=TASK,
                                model_dir=str(tmp_path / "run"), index_dir=str(tmp_path / "index"))
  _assert_starts_from(got, source, shared, layout.vocab_size)
  record = json.loads((tmp_path / "run" / finetune.INIT_FILE).read_text())
  assert record["init"] == "indexer" and record["source"] == str(tmp_path / "index" / "indexer_t5")
  assert record["shared_rows"] == shared and record["vocab_size"] == layout.vocab_size
  assert record["codebook_sizes"] == list(CODEBOOKS)

  # An indexer of another vocabulary (here: one code token fewer) is refused.
  finetune.save_indexer_t5(str(tmp_path / "other"), _indexer_t5(shared - 1))
  with pytest.raises(ValueError, match=f"has {shared - 1} token rows"):
    finetune.initial_params(init="indexer", t5_config=config, task_name=TASK,
                            model_dir=str(tmp_path / "run"), index_dir=str(tmp_path / "other"))

  # So is an indexer of another architecture (one layer each side instead of two).
  finetune.save_indexer_t5(str(tmp_path / "shallow"), _indexer_t5(shared, num_layers=1))
  with pytest.raises(ValueError, match=r"do not fit the model .*\['decoder'\]\['layers_1'\]"):
    finetune.initial_params(init="indexer", t5_config=config, task_name=TASK,
                            model_dir=str(tmp_path / "run"), index_dir=str(tmp_path / "shallow"))


def _fake_index_run(index_dir: pathlib.Path, id_file: str, codebook_sizes, t5_params) -> dict:
  """A finished indexing run's last quantized stage, written by the trainer's checkpointer."""
  rng = np.random.default_rng(1)
  params = {"t5": t5_params}
  for t, k in enumerate(codebook_sizes):
    params[f"quantizers_{t}"] = {"codebook": rng.normal(size=(k, 32)).astype(np.float32)}
  last = len(codebook_sizes) - 1
  checkpointer = checkpoints.Checkpointer(
      str(index_dir / "stages" / f"quantized_{last}" / "checkpoints"),
      checkpoints.CheckpointConfig(keep=1))
  checkpointer.save(6, train.TrainState(jnp.asarray(6, jnp.int32), params, ()))
  checkpointer.close()
  (index_dir / "stages" / "quantized_0").mkdir(exist_ok=True)
  shutil.copy(id_file, index_dir / semantic_ids.FILE_NAME)
  return params


def test_init_from_the_indexer_stages(tmp_path, id_file):
  """Without indexer_t5/: the last quantized stage's T5 with its codebook copied in."""
  layout = _layout()
  shared = layout.vocab_size - layout.disambiguation_size
  t5_params = _indexer_t5(shared)
  stage_params = _fake_index_run(tmp_path / "index", id_file, CODEBOOKS, t5_params)
  params, source, indexer_layout = finetune.indexer_t5_params(str(tmp_path / "index"))
  assert source.endswith(os.path.join("stages", "quantized_1"))
  assert indexer_layout.base_size == layout.base_size
  start, end = layout.position_range(1)
  codebook = stage_params["quantizers_1"]["codebook"]
  np.testing.assert_array_equal(params["token_embedder"]["embedding"][start:end], codebook)
  np.testing.assert_array_equal(params["logits_dense"]["kernel"][:, start:end], codebook.T)
  expected = jax.tree.map(np.copy, t5_params)
  expected["token_embedder"]["embedding"][start:end] = codebook
  expected["logits_dense"]["kernel"][:, start:end] = codebook.T
  got = finetune.initial_params(
      init="indexer", t5_config=finetune.task_model_config(_tiny_config(0), TASK), task_name=TASK,
      model_dir=str(tmp_path / "run"), index_dir=str(tmp_path / "index"))
  _assert_starts_from(got, expected, shared, layout.vocab_size)

  # Codebooks of other sizes than the ID file's are named in the error.
  _fake_index_run(tmp_path / "other", id_file, (4, 3), _indexer_t5(shared - 1))
  with pytest.raises(ValueError, match=r"codebooks \(4, 3\)"):
    finetune.initial_params(
        init="indexer", t5_config=finetune.task_model_config(_tiny_config(0), TASK),
        task_name=TASK, model_dir=str(tmp_path / "run"), index_dir=str(tmp_path / "other"))


def test_scratch_is_the_trainers_initialisation(tmp_path):
  config = finetune.task_model_config(_tiny_config(0, num_layers=1), TASK)
  got = finetune.initial_params(init="scratch", t5_config=config, task_name=TASK,
                                model_dir=str(tmp_path), seed=3)
  batch_spec = {k: jax.ShapeDtypeStruct((2, 5), jnp.int32)
                for k in ("encoder_input_tokens", "decoder_input_tokens")}
  _, init_state = train.state_shardings(
      models.EncoderDecoderModel(t5.Transformer(config)), optax.sgd(0.1),
      partitioning.Partitioner(num_devices=1), batch_spec)
  params_rng, _ = jax.random.split(jax.random.PRNGKey(3))  # as train.train splits its seed
  want = jax.device_get(init_state(params_rng).params)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert json.loads((tmp_path / finetune.INIT_FILE).read_text())["init"] == "scratch"


def test_init_from_hugging_face(tmp_path, monkeypatch):
  layout = _layout()
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps({"vocab_size": 64}))
  calls = []

  def fake_pretrained_params(path, vocab_size=None, seed=0):
    calls.append((path, vocab_size, seed))
    return _indexer_t5(vocab_size)  # a T5 of the fine-tuning model's architecture

  monkeypatch.setattr(checkpoint_import, "pretrained_params", fake_pretrained_params)
  finetune.initial_params(init="hf", t5_config=finetune.task_model_config(_tiny_config(0), TASK),
                          task_name=TASK, model_dir=str(tmp_path / "run"), hf_dir=str(hf_dir))
  assert calls == [(str(hf_dir), layout.vocab_size, 1)]
  record = json.loads((tmp_path / "run" / finetune.INIT_FILE).read_text())
  assert record["init"] == "hf" and record["source"] == str(hf_dir)
  assert record["shared_rows"] == 64


def test_bad_initialisations(tmp_path):
  config = finetune.task_model_config(_tiny_config(0), TASK)
  kwargs = dict(t5_config=config, task_name=TASK, model_dir=str(tmp_path))
  with pytest.raises(ValueError, match="INIT must be one of"):
    finetune.initial_params(init="pretrained", **kwargs)
  with pytest.raises(ValueError, match="needs INDEX_DIR"):
    finetune.initial_params(init="indexer", **kwargs)
  with pytest.raises(ValueError, match="needs HF_DIR"):
    finetune.initial_params(init="hf", **kwargs)
  with pytest.raises(FileNotFoundError, match="no finished indexing run"):
    finetune.initial_params(init="indexer", index_dir=str(tmp_path / "nothing"), **kwargs)
  with pytest.raises(ValueError, match="vocab_size"):
    finetune.initial_params(init="scratch", **dict(kwargs, t5_config=_tiny_config(100)))
  positions = finetune.task_id_vocabulary(TASK).layout.num_positions
  with pytest.raises(ValueError, match=f"TARGET_LENGTH .* at least {positions + 1}"):
    finetune.initial_params(init="scratch", feature_lengths={"inputs": 8, "targets": positions},
                            **kwargs)
  with pytest.raises(ValueError, match="not an ID task"):
    finetune.task_id_vocabulary("lmindexer.synthetic.index")


def _gin_train(monkeypatch, gin_file: str, *bindings: str) -> tuple[train.TrainState, str]:
  """What `python -m lmindexer_jax.train` does with these flags, in this process.

  Returns:
    The final state and the config in force (what `config.gin` records).
  """
  # Gin files bind `train_script.train` of `import __main__ as train_script`.
  monkeypatch.setattr(sys.modules["__main__"], "train", train.train, raising=False)
  monkeypatch.setattr(sys.modules["__main__"], "run", train.run, raising=False)
  gin.clear_config()
  try:
    gin_utils.parse([gin_file, "gin/data/synthetic.gin"],
                    [b.removeprefix("--gin.").replace("=", " = ", 1) for b in bindings], [])
    with settings.configured():
      gin_utils.configure_task_settings()
      state = gin.get_configurable(train.train)()
      return state, gin.config_str()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("gin_file, task, input_length", [
    ("gin/runs/finetune_retrieval.gin", "retrieval_indexing", 64),
    ("gin/runs/finetune_search.gin", "search", 32),
    ("gin/runs/finetune_rec.gin", "rec", 128),
])
def test_gin_runs_start_from_the_indexer(tmp_path, id_file, gin_file, task, input_length,
                                         monkeypatch):
  """Each run file: its task, its lengths, and the trainer's state at step 0 is the indexer's."""
  monkeypatch.chdir(REPO)
  layout = _layout()
  shared = layout.vocab_size - layout.disambiguation_size
  source = _indexer_t5(shared)
  finetune.save_indexer_t5(str(tmp_path / "index"), source)
  state, config = _gin_train(
      monkeypatch, gin_file, *TINY_GIN, f"--gin.ID_FILE='{id_file}'",
      f"--gin.MODEL_DIR='{tmp_path / 'run'}'", f"--gin.INDEX_DIR='{tmp_path / 'index'}'",
      "--gin.TRAIN_STEPS=0", "--gin.BATCH_SIZE=8")
  assert int(state.step) == 0
  assert f"INPUT_LENGTH = {input_length}" in config and "INIT = 'indexer'" in config
  _assert_starts_from(jax.device_get(state.params), source, shared, layout.vocab_size)
  record = json.loads((tmp_path / "run" / finetune.INIT_FILE).read_text())
  assert record["task"] == f"lmindexer.synthetic.{task}" and record["init"] == "indexer"
  info = (tmp_path / "run" / "model-info.txt").read_text()
  assert f"({layout.vocab_size}, 32)" in info  # the token embedding


def test_finetune_run_trains(tmp_path, id_file, monkeypatch):
  """A short retrieval run from a saved indexer T5: the loss falls, the run records its init."""
  monkeypatch.chdir(REPO)
  shared = _layout().vocab_size - _layout().disambiguation_size
  finetune.save_indexer_t5(str(tmp_path / "index"), _indexer_t5(shared, num_layers=1))
  model_dir = tmp_path / "run"
  state, config = _gin_train(
      monkeypatch, "gin/runs/finetune_retrieval.gin", *TINY_GIN, f"--gin.ID_FILE='{id_file}'",
      f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INDEX_DIR='{tmp_path / 'index'}'",
      "--gin.TRAIN_STEPS=30", "--gin.BATCH_SIZE=16", "--gin.LEARNING_RATE=3e-3",
      "--gin.WARMUP_STEPS=4", "--gin.LOG_PERIOD=5", "--gin.partitioning.Partitioner.num_devices=1",
      "--gin.t5.T5Config.num_encoder_layers=1", "--gin.t5.T5Config.num_decoder_layers=1")
  assert int(state.step) == 30
  losses = [json.loads(line)["loss"] for line in (model_dir / "metrics.jsonl").open()]
  assert len(losses) == 6
  assert losses[-1] < losses[0] - 1.0, losses  # nats
  assert "INIT = 'indexer'" in config
  assert json.loads((model_dir / finetune.INIT_FILE).read_text())["init"] == "indexer"
