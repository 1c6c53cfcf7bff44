"""Where a downstream fine-tuning run (retrieval, search, recommendation) starts from.

The fine-tuning tasks (`lmindexer.<dataset>.retrieval_indexing`, `.search`, `.rec`) map text to
semantic IDs in a `SemanticIdVocabulary`: the corpus's base vocabulary, then one token per code
of each learned position, then the disambiguation position's tokens. Three initialisations
(`INITS`, the `INIT` macro of gin/runs/finetune_*.gin):

- "indexer" (the paper's choice): the semantic indexer's own T5 at the end of its schedule,
  the last codebook copied into the ID-token embeddings, so the model starts out assigning the
  IDs it learned. Its vocabulary is base + code tokens; the disambiguation tokens are appended
  (`checkpoint_import.extend_vocab`).
- "hf": a local Hugging Face T5 folder (`checkpoint_import.pretrained_params`), every ID token
  appended.
- "scratch": the model's own random initialisation (the trainer's, for the same seed).

`initial_params` writes `MODEL_DIR/init.json` saying which one a run started from; given the
feature lengths it also records what evaluation needs to rebuild the run (`run_record`: the
model's config, the task settings in force, the ID file), read back by `lmindexer_jax.eval`.

The indexer's final T5 is read from `<index_dir>/indexer_t5/` (an orbax checkpoint of the T5
parameters, `save_indexer_t5`); while the indexing pipeline does not write it, it is rebuilt
from the pipeline's last quantized stage the way the pipeline builds it in memory.
"""

from collections.abc import Mapping
import dataclasses
import importlib
import json
import os
import re
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import seqio

from lmindexer_jax import checkpoint_import
from lmindexer_jax import files
from lmindexer_jax import t5
from lmindexer_jax import vocabularies
from tasks import semantic_ids
from tasks import settings

INITS = ("indexer", "hf", "scratch")
INDEXER_T5_DIR = "indexer_t5"  # under the indexer's MODEL_DIR
INIT_FILE = "init.json"  # under the fine-tuning run's MODEL_DIR


def dataset_task(index_task: str, task: str) -> str:
  """The `task` of the dataset whose index task is `index_task`.

  `("lmindexer.nq320k.index", "retrieval_indexing")` -> `"lmindexer.nq320k.retrieval_indexing"`,
  so one gin/data file names the dataset for indexing and fine-tuning alike.
  """
  prefix, sep, last = index_task.rpartition(".")
  if not sep or last != "index":
    raise ValueError(f"INDEX_TASK {index_task!r} is not a '<prefix>.<dataset>.index' task name")
  return f"{prefix}.{task}"


def task_id_vocabulary(
    task_name: str, module: str | None = "tasks"
) -> vocabularies.SemanticIdVocabulary:
  """The targets vocabulary of an ID task or mixture (resolved: its ID file is read)."""
  if module:
    importlib.import_module(module)
  provider = seqio.get_mixture_or_task(task_name)
  task = provider.tasks[0] if isinstance(provider, seqio.Mixture) else provider
  vocabulary = task.output_features["targets"].vocabulary
  if isinstance(vocabulary, vocabularies.LazyVocabulary):
    vocabulary = vocabulary.resolve()
  if not isinstance(vocabulary, vocabularies.SemanticIdVocabulary):
    raise ValueError(f"{task_name} is not an ID task: its targets vocabulary is {vocabulary}")
  return vocabulary


def task_model_config(config: t5.T5Config, task_name: str) -> t5.T5Config:
  """`config` with the vocabulary size of the task's ID vocabulary."""
  return config.replace(vocab_size=task_id_vocabulary(task_name).vocab_size)


def save_indexer_t5(index_dir: str, t5_params: Any) -> str:
  """Writes the indexer's final T5 parameters to `<index_dir>/indexer_t5/` (orbax, atomic)."""
  path = os.path.abspath(os.path.join(index_dir, INDEXER_T5_DIR))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, jax.tree.map(np.asarray, t5_params), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return path


def _load_params(path: str) -> dict:
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(os.path.abspath(path))
  checkpointer.close()
  return jax.tree.map(np.asarray, params)


def indexer_t5_params(index_dir: str) -> tuple[dict, str, vocabularies.IdLayout | None]:
  """The indexer's final T5 parameters, where they came from, and their ID layout if known.

  Read from `<index_dir>/indexer_t5/` if present. Otherwise rebuilt from the last
  `stages/quantized_<t>` stage of a finished indexing run: its final parameters with
  codebook t copied into the ID-token embeddings (earlier codebooks were copied before the
  later stages trained on), i.e. what `index_pipeline.index` holds when it writes the IDs.

  Raises:
    FileNotFoundError: `index_dir` holds neither a saved T5 nor a finished indexing run.
  """
  saved = os.path.join(index_dir, INDEXER_T5_DIR)
  if os.path.isdir(saved):
    return _load_params(saved), saved, None
  # Imported here: the pipeline may import this module to save its T5.
  from lmindexer_jax import index_pipeline

  stages = os.path.join(index_dir, "stages")
  positions = sorted(
      int(m[1]) for m in map(re.compile(r"quantized_(\d+)").fullmatch,
                             os.listdir(stages) if os.path.isdir(stages) else ()) if m
  )
  if not positions or not os.path.exists(os.path.join(index_dir, "semantic_ids.tsv")):
    raise FileNotFoundError(
        f"{index_dir}: no {INDEXER_T5_DIR}/ and no finished indexing run (stages/quantized_<t> "
        "and semantic_ids.tsv); run gin/runs/index.gin with MODEL_DIR there first"
    )
  last = positions[-1]
  stage_dir = os.path.join(stages, f"quantized_{last}")
  params = index_pipeline.final_params(stage_dir)
  codebook_sizes = tuple(
      int(params[f"quantizers_{t}"]["codebook"].shape[0]) for t in range(last + 1)
  )
  rows = params["t5"]["token_embedder"]["embedding"].shape[0]
  layout = vocabularies.IdLayout(rows - sum(codebook_sizes), codebook_sizes)
  params = index_pipeline.copy_codebook_into_vocabulary(
      params, np.asarray(params[f"quantizers_{last}"]["codebook"]), layout, last
  )
  return jax.tree.map(np.asarray, params["t5"]), stage_dir, layout


def _scratch_params(config: t5.T5Config, seed: int) -> dict:
  """The trainer's own initialisation for `seed` (`train.train` splits the seed's key)."""
  params_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  tokens = jnp.ones((1, 1), jnp.int32)
  init = jax.jit(
      lambda rng: nn.unbox(t5.Transformer(config).init(
          {"params": rng}, tokens, tokens, enable_dropout=False))["params"]
  )
  return jax.tree.map(np.asarray, init(params_rng))


def initial_params(
    *,
    init: str,
    t5_config: t5.T5Config,
    task_name: str,
    model_dir: str,
    index_dir: str = "",
    hf_dir: str = "",
    seed: int = 0,
    feature_lengths: Mapping[str, int] | None = None,
) -> dict:
  """The parameters a fresh fine-tuning run starts from (`train.train(init_params_fn=...)`).

  Args:
    init: one of `INITS`.
    t5_config: the fine-tuned model (vocab_size: the task's ID vocabulary, `task_model_config`).
    task_name: the fine-tuning task or mixture; its ID vocabulary must extend the indexer's.
    model_dir: the run's MODEL_DIR; `init.json` is written there.
    index_dir: the indexer's MODEL_DIR (init "indexer").
    hf_dir: a Hugging Face T5 folder (init "hf").
    seed: seeds the appended rows (and the scratch initialisation, as the trainer's seed).
    feature_lengths: the task's {'inputs': L, 'targets': T}; when given, `init.json` also holds
      `run_record(...)`, what evaluation needs to rebuild the run.

  Returns:
    T5 parameters with numpy leaves; rows [0, shared_rows) of the token embedding (and
    columns of an untied head) are the source's, the rest are freshly initialised.

  Raises:
    ValueError: a bad `init`, targets too short for the IDs, or a source whose vocabulary or
      architecture (parameter shapes, `checkpoint_import.check_params_fit`) is not
      `t5_config`'s.
  """
  if init not in INITS:
    raise ValueError(f"INIT must be one of {INITS}, got {init!r}")
  layout = task_id_vocabulary(task_name).layout
  if t5_config.vocab_size != layout.vocab_size:
    raise ValueError(
        f"the model's vocab_size ({t5_config.vocab_size}) is not the vocabulary size of "
        f"{task_name} ({layout.vocab_size}); size it with finetune.task_model_config"
    )
  if feature_lengths is not None and int(feature_lengths["targets"]) < layout.num_positions + 1:
    raise ValueError(
        f"targets of {feature_lengths['targets']} tokens would cut the IDs of "
        f"{settings.get(semantic_ids.IdFile).path or task_name} ({layout.num_positions} "
        f"positions + EOS): set TARGET_LENGTH (FinetuneConfig.target_length) to at least "
        f"{layout.num_positions + 1}")
  rng = jax.random.PRNGKey(seed + 1)  # The appended rows: not the scratch init's key.
  if init == "indexer":
    if not index_dir:
      raise ValueError("INIT 'indexer' needs INDEX_DIR, the indexing run's MODEL_DIR")
    params, source, indexer_layout = indexer_t5_params(index_dir)
    shared = params["token_embedder"]["embedding"].shape[0]
    expected = layout.vocab_size - layout.disambiguation_size  # base + code tokens
    if indexer_layout is not None and indexer_layout != _learned_layout(layout):
      raise ValueError(
          f"the indexer in {index_dir} has base vocabulary {indexer_layout.base_size} and "
          f"codebooks {indexer_layout.codebook_sizes}, but {task_name} (ID file and corpus) "
          f"has {layout.base_size} and {layout.codebook_sizes}"
      )
    if shared != expected:
      raise ValueError(
          f"the indexer's T5 in {source} has {shared} token rows, but {task_name} has "
          f"{layout.base_size} base + {layout.num_id_tokens - layout.disambiguation_size} code "
          f"tokens = {expected}: the ID file or the corpus is not the indexer's"
      )
    params = checkpoint_import.extend_vocab(params, layout.vocab_size, rng)
  elif init == "hf":
    if not hf_dir:
      raise ValueError("INIT 'hf' needs HF_DIR, a Hugging Face T5 folder")
    source = hf_dir
    params = checkpoint_import.pretrained_params(hf_dir, layout.vocab_size, seed=seed + 1)
    shared = min(_hf_rows(hf_dir), layout.vocab_size)
    if shared != layout.base_size:
      logging.warning(
          "%s has %d token rows but the corpus vocabulary of %s has %d pieces: unless the "
          "corpus uses the folder's spiece.model, its pretrained rows mean other pieces.",
          hf_dir, shared, task_name, layout.base_size)
  else:
    source, shared = None, 0
    params = _scratch_params(t5_config, seed)
  if source is not None:
    checkpoint_import.check_params_fit(params, t5_config, source)
  if jax.process_index() == 0:
    files.write_json(os.path.join(model_dir, INIT_FILE), {
        "init": init,
        "source": source,
        "task": task_name,
        "vocab_size": layout.vocab_size,
        "base_vocab_size": layout.base_size,
        "codebook_sizes": list(layout.codebook_sizes),
        "disambiguation_size": layout.disambiguation_size,
        "shared_rows": int(shared),
        "seed": seed,
        **(run_record(t5_config, feature_lengths) if feature_lengths is not None else {}),
    })
  return jax.tree.map(np.asarray, params)


def run_record(t5_config: t5.T5Config, feature_lengths: Mapping[str, int]) -> dict[str, Any]:
  """What rebuilds a fine-tuning run outside its gin config (JSON-ready).

  The model's config (vocab_size included), the task's feature lengths, the ID file (absolute
  path) and every `tasks.settings` config in force (corpus sizes, data folders), so that the
  run's task resolves to the same corpus, vocabulary and IDs.
  """
  config = dataclasses.asdict(t5_config)
  config["dtype"] = str(np.dtype(config["dtype"]))
  config["mlp_activations"] = list(config["mlp_activations"])
  task_settings = {}
  for cls in settings.CONFIG_CLASSES:
    value = dataclasses.asdict(settings.get(cls))
    if cls is semantic_ids.IdFile and value["path"]:
      value["path"] = os.path.abspath(value["path"])
    task_settings[f"{cls.__module__}.{cls.__qualname__}"] = value
  return {
      "t5_config": config,
      "feature_lengths": {k: int(v) for k, v in feature_lengths.items()},
      "id_file": os.path.abspath(settings.get(semantic_ids.IdFile).path),
      "task_settings": task_settings,
  }


def settings_from_record(record: Mapping[str, Any]) -> list[Any]:
  """The `tasks.settings` configs of a `run_record` (pass them to `settings.configured`)."""
  configs = []
  for name, value in record.get("task_settings", {}).items():
    module_name, _, class_name = name.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    configs.append(cls(**{k: _tuples(v) for k, v in value.items()}))
  return configs


def t5_config_from_record(record: Mapping[str, Any]) -> t5.T5Config:
  """The fine-tuned model's config of a `run_record`."""
  return t5.T5Config(**{k: _tuples(v) for k, v in record["t5_config"].items()})


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the frozen configs hold."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _learned_layout(layout: vocabularies.IdLayout) -> vocabularies.IdLayout:
  """The layout without its disambiguation position (the indexer's vocabulary)."""
  return vocabularies.IdLayout(layout.base_size, layout.codebook_sizes)


def _hf_rows(hf_dir: str) -> int:
  with open(os.path.join(hf_dir, "config.json")) as f:
    return int(json.load(f).get("vocab_size", 32128))
