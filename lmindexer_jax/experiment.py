"""The main job: index -> IDs of each scheme -> fine-tune each task on each -> evaluate -> table.

  run(model_dir="runs/quickstart", index_task="lmindexer.synthetic.index", indexer=..., ...)

1. `indexer(model_dir=MODEL_DIR/index)`: the semantic indexer (`index_pipeline.index`, its
   schedule bound in gin) writes the learned IDs, scheme "learned".
2. Each baseline scheme's `make_ids(model_dir=MODEL_DIR/ids/<scheme>, encoder=...)`
   (`baselines.id_pipeline.make_ids`). Vector schemes (RQ-VAE, k-means) read the mean-pooled
   states of the indexer's OWN trained T5 encoder (its final stage), so learned and
   baseline IDs start from the same representations: the comparison is of the ID schemes, not
   of encoders.
3. For each task and scheme, fine-tune (`MODEL_DIR/<task>/<scheme>/`) at the same model size,
   step budget and initialisation (`init`, default "scratch"; `learned_init="indexer"` gives the
   learned IDs the indexer's checkpoint, the paper's choice), then `eval.evaluate` on `split`.
4. Print one table (task x scheme) and write `MODEL_DIR/results.json`.

Every sub-run lives in its own directory and a rerun resumes: the indexer skips its finished
stages, a scheme whose `semantic_ids.tsv` exists is not rebuilt, a run whose
`metrics_<split>.json` exists is not trained or evaluated again, and an interrupted
fine-tuning run resumes from its last checkpoint. (So after changing a setting, use a new
MODEL_DIR or delete the sub-runs it affects.)
"""

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from concurrent import futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

from lmindexer_jax import checkpoints
from lmindexer_jax import data
from lmindexer_jax import eval as eval_lib
from lmindexer_jax import evaluation
from lmindexer_jax import files
from lmindexer_jax import finetune
from lmindexer_jax import indexer_manifest
from lmindexer_jax import models
from lmindexer_jax import optimizers
from lmindexer_jax import partitioning
from lmindexer_jax import t5
from lmindexer_jax import train
from lmindexer_jax.baselines import embeddings
from tasks import semantic_ids
from tasks import settings

LEARNED = "learned"
RESULTS_FILE = "results.json"
TABLE_COLUMNS = ("recall@1", "recall@10", "ndcg@10", "mrr@10", "invalid_ids")
# Rec rows show the metrics with the user's earlier items kept; results.json has both.


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The budget of the comparison's fine-tuning runs (gin-bound): every scheme of a task gets
  the same one.

  Attributes:
    train_steps, batch_size, learning_rate, warmup_steps: AdamW, linear decay.
    target_length: ID positions + EOS.
    log_period, checkpoint_period: as in `train.train`.
    dropout_rate: the fine-tuning model's dropout; None keeps the model config's (which the
      indexer shares: its settings may want another).
  """

  train_steps: int = 300
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  target_length: int = 8
  log_period: int = 50
  checkpoint_period: int = 1000
  dropout_rate: float | None = None


def finetune_run(
    *,
    model_dir: str,
    task_name: str,
    id_file: str,
    t5_config: t5.T5Config,
    input_length: int,
    config: FinetuneConfig,
    init: str = "scratch",
    index_dir: str = "",
    seed: int = 0,
    partitioner: partitioning.Partitioner | None = None,
    disambiguation_size: int | None = None,
) -> int:
  """Fine-tunes (or resumes) `task_name` on the IDs of `id_file`, as gin/runs/finetune.gin does.

  `disambiguation_size` overrides the ID file's (`semantic_ids.IdFile`): the comparison gives
  every scheme of the same codebook sizes the same vocabulary, hence the same model size (atomic
  IDs have a code per document). The settings in force are
  recorded in `init.json`, so `eval.evaluate` reads the IDs the same way.

  Returns:
    The step reached.
  """
  id_config = dataclasses.replace(settings.get(semantic_ids.IdFile), path=id_file)
  if disambiguation_size is not None:
    id_config = dataclasses.replace(id_config, disambiguation_size=int(disambiguation_size))
  with settings.configured(id_config):
    model_config = finetune.task_model_config(t5_config, task_name)
    if config.dropout_rate is not None:
      model_config = model_config.replace(dropout_rate=config.dropout_rate)
    lengths = {"inputs": int(input_length), "targets": int(config.target_length)}
    state = train.train(
        model=models.EncoderDecoderModel(t5.Transformer(model_config)),
        train_dataset_cfg=data.DatasetConfig(
            mixture_or_task_name=task_name, task_feature_lengths=lengths,
            batch_size=config.batch_size, split="train", shuffle=True, seed=seed),
        optimizer=optimizers.adamw(config.learning_rate, total_steps=config.train_steps,
                                   warmup_steps=config.warmup_steps, decay="linear"),
        total_steps=config.train_steps,
        model_dir=model_dir,
        partitioner=partitioner,
        checkpoint_cfg=checkpoints.CheckpointConfig(config.checkpoint_period, keep=1),
        seed=seed,
        log_period=config.log_period,
        init_params_fn=lambda: finetune.initial_params(
            init=init, t5_config=model_config, task_name=task_name, model_dir=model_dir,
            index_dir=index_dir, seed=seed, feature_lengths=lengths),
    )
  return int(state.step)


def indexer_encoder(index_dir: str) -> embeddings.EncoderSource:
  """The finished indexer's final T5, for the vector schemes, at the indexer's own sizes (which
  a scoped `index_pipeline.index.t5_config` may set apart from the fine-tuning runs')."""
  manifest = indexer_manifest.read_indexer_manifest(index_dir)
  return embeddings.EncoderSource(t5_config=manifest.t5_config,
                                  checkpoint_dir=manifest.stage_dir(manifest.final_stage))


def use_compilation_cache(directory: str | None) -> None:
  """Keeps XLA's compiled programs in `directory` (None: no persistent cache), from now on."""
  jax.config.update("jax_compilation_cache_dir",
                    None if directory is None else os.path.abspath(directory))
  compilation_cache.reset_cache()  # Else a process that compiled before ignores the change.


@contextlib.contextmanager
def compilation_cache_at(directory: str | None) -> Iterator[None]:
  """`use_compilation_cache(directory)` within the block; the process's setting before it
  (e.g. the `JAX_COMPILATION_CACHE_DIR` of a test session) comes back after it."""
  previous = jax.config.jax_compilation_cache_dir
  use_compilation_cache(directory)
  try:
    yield
  finally:
    use_compilation_cache(previous)


@dataclasses.dataclass(frozen=True)
class _SubRun:
  """One fine-tuning run and its evaluation: `finetune_run(**finetune)`, `evaluate(**evaluate)`."""

  label: str
  finetune: dict[str, Any]
  evaluate: dict[str, Any]

  def __call__(self) -> None:
    steps = self.finetune["config"].train_steps
    _say(f"[3/4] {self.label}: fine-tune {steps} steps from {self.finetune['init']} in "
         f"{self.finetune['model_dir']}")
    step = finetune_run(**self.finetune)
    if step < steps:
      raise RuntimeError(f"{self.finetune['model_dir']} stopped at step {step} (preempted): run "
                         "the job again")
    _say(f"[4/4] {self.label}: evaluate on {self.evaluate['split']}")
    eval_lib.evaluate(**self.evaluate)


def _start_worker(task_settings: Sequence[Any], cache_dir: str | None) -> None:
  settings.configure(*task_settings)
  if cache_dir:
    use_compilation_cache(cache_dir)


def _run_all(sub_runs: Sequence[_SubRun], workers: int, cache_dir: str | None) -> None:
  """Runs every sub-run, up to `workers` at once in fresh processes.

  A tiny model's step does not keep two cores busy, but on 2 cores the gain is small: the
  quickstart's six runs took 249 s and 295 s in two workers (start-up included) against 302 s
  one after another; more cores gain more. Each sub-run writes its own directory, so nothing
  is shared but the compilation cache. With several hosts (`jax.distributed`) every host must
  run the same program in step, so there the runs go one after another.
  """
  if workers <= 1 or len(sub_runs) <= 1 or jax.process_count() > 1:
    for sub_run in sub_runs:
      sub_run()
    return
  # "spawn": a forked child would inherit this process's XLA runtime and threads.
  with futures.ProcessPoolExecutor(
      min(workers, len(sub_runs)), mp_context=multiprocessing.get_context("spawn"),
      initializer=_start_worker, initargs=(settings.active(), cache_dir)) as pool:
    done = [pool.submit(sub_run) for sub_run in sub_runs]
    try:
      for future in futures.as_completed(done):
        future.result()  # A sub-run's error, raised here.
    except BaseException:
      pool.shutdown(wait=False, cancel_futures=True)
      raise


def _say(message: str) -> None:
  print(f"[experiment] {message}", flush=True)


def run(
    *,
    model_dir: str,
    index_task: str,
    indexer: Callable[..., Any],
    id_makers: Mapping[str, Callable[..., Any]],
    tasks: Mapping[str, int],
    t5_config: t5.T5Config,
    finetune_config: FinetuneConfig | None = None,
    task_finetune_configs: Mapping[str, FinetuneConfig] | None = None,
    init: str = "scratch",
    learned_init: str | None = None,
    split: str = "test",
    beam_size: int = 20,
    eval_batch_size: int = 64,
    seed: int = 0,
    partitioner: partitioning.Partitioner | None = None,
    compilation_cache: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
  """Runs (or resumes) the whole comparison; returns what `results.json` holds.

  Args:
    model_dir: the job's directory; sub-runs go to index/, ids/<scheme>/, <task>/<scheme>/.
    index_task: the dataset's `lmindexer.<dataset>.index` task (names its other tasks).
    indexer: `index_pipeline.index` with its settings bound; called with `model_dir`.
    id_makers: scheme -> `id_pipeline.make_ids` with its settings bound; called with
      `model_dir` and `encoder` (the indexer's final encoder, used by vector schemes).
    tasks: fine-tuning task (`retrieval_indexing`, `search`, `rec`, ...) -> its input length.
    t5_config: the model of every fine-tuning run; an "indexer" init needs the indexer's
      architecture (the vector schemes read the indexer's own config from its manifest).
    finetune_config: the budget of every task without its own (default `FinetuneConfig()`).
    task_finetune_configs: task -> its own budget, replacing `finetune_config` for every
      scheme of that task (e.g. more steps for a task that learns slower). Tasks not in
      `tasks` are ignored (said in the log), so a gin file's budget survives a narrower
      FINETUNE_TASKS.
    init: every run's initialisation, "scratch" (default) or "indexer" (`finetune.INITS`).
    learned_init: overrides `init` for the learned IDs (e.g. "indexer"); None: `init`.
    split: the evaluation split.
    beam_size: beams (and IDs returned) per query; metrics @K are reported for K <= it.
    eval_batch_size: queries per decoder call.
    seed: seeds every sub-run.
    partitioner: the mesh of the fine-tuning runs.
    compilation_cache: keep XLA's compiled programs in MODEL_DIR/jax_cache (JAX's persistent
      cache): runs of equal shapes (schemes of the same vocabulary; tasks of the same input
      length) then compile their train step once, and a rerun compiles nothing again.
  """
  start = time.time()
  finetune_config = finetune_config or FinetuneConfig()
  task_finetune_configs = task_finetune_configs or {}
  if unused := sorted(set(task_finetune_configs) - set(tasks)):
    _say(f"task_finetune_configs for tasks this job does not run, ignored: {unused}")
  budgets = {task: task_finetune_configs.get(task, finetune_config) for task in tasks}
  train.prepare_model_dir(model_dir)
  cache_dir = os.path.join(model_dir, "jax_cache") if compilation_cache else None
  # The cache is this job's; the caller's setting comes back after it.
  with compilation_cache_at(cache_dir) if cache_dir else contextlib.nullcontext():
    index_dir = os.path.join(model_dir, "index")
    _say(f"[1/4] indexing {index_task} in {index_dir}")
    id_files = _make_id_files(model_dir, index_dir, indexer, id_makers)
    # One disambiguation size for all: schemes of the same codebook sizes get the same
    # vocabulary and model size.
    disambiguation_size = max(semantic_ids.read(path).disambiguation_size
                              for path in id_files.values())
    runs = [(task, scheme) for task in tasks for scheme in id_files]
    to_do = []
    for i, (task, scheme) in enumerate(runs, start=1):
      run_dir = os.path.join(model_dir, task, scheme)
      if os.path.exists(_metrics_path(run_dir, split)):
        _say(f"[3/4] run {i}/{len(runs)} {task} x {scheme}: done before, skipped")
        continue
      to_do.append(_SubRun(
          label=f"run {i}/{len(runs)} {task} x {scheme}",
          finetune=dict(
              model_dir=run_dir, task_name=finetune.dataset_task(index_task, task),
              id_file=id_files[scheme], t5_config=t5_config, input_length=tasks[task],
              config=budgets[task],
              init=learned_init if scheme == LEARNED and learned_init else init,
              index_dir=index_dir, seed=seed,
              partitioner=partitioner and dataclasses.replace(partitioner),
              disambiguation_size=disambiguation_size),
          evaluate=dict(model_dir=run_dir, split=split, beam_size=beam_size,
                        batch_size=eval_batch_size, verbose=False)))
    _run_all(to_do, workers, cache_dir)

    results = {
        "split": split, "beam_size": beam_size,
        "finetune": {task: dataclasses.asdict(budget) for task, budget in budgets.items()},
        "disambiguation_size": disambiguation_size, "tasks": {}}
    for task, scheme in runs:
      run_dir = os.path.join(model_dir, task, scheme)
      results["tasks"].setdefault(task, {})[scheme] = _table_entry(run_dir, split)
    results["seconds_this_call"] = round(time.time() - start, 1)
    files.write_json(os.path.join(model_dir, RESULTS_FILE), results)
    print(results_table(results), end="", flush=True)
    _say(f"wrote {os.path.join(model_dir, RESULTS_FILE)} ({results['seconds_this_call']:.0f} s)")
    return results


def _make_id_files(model_dir: str, index_dir: str, indexer: Callable[..., Any],
                   id_makers: Mapping[str, Callable[..., Any]]) -> dict[str, str]:
  """Steps 1 and 2: scheme -> its `semantic_ids.tsv`, each built unless it exists."""
  id_files = {LEARNED: os.path.join(index_dir, semantic_ids.FILE_NAME)}
  if os.path.exists(id_files[LEARNED]):
    _say("indexing: done before, skipped")
  elif indexer(model_dir=index_dir) is None:
    raise RuntimeError("indexing stopped before its end (preempted): run the job again")
  encoder = indexer_encoder(index_dir)
  for scheme, make_ids in id_makers.items():
    scheme_dir = os.path.join(model_dir, "ids", scheme)
    id_files[scheme] = os.path.join(scheme_dir, semantic_ids.FILE_NAME)
    if os.path.exists(id_files[scheme]):
      _say(f"[2/4] {scheme} IDs: done before, skipped")
      continue
    _say(f"[2/4] {scheme} IDs in {scheme_dir}")
    make_ids(model_dir=scheme_dir, encoder=encoder)
  return id_files


def _metrics_path(run_dir: str, split: str) -> str:
  return os.path.join(run_dir, eval_lib.METRICS_FILE.format(split=split))


def _table_entry(run_dir: str, split: str) -> dict[str, Any]:
  """A finished run's `results.json` entry: its metrics and how they were obtained."""
  with open(_metrics_path(run_dir, split)) as f:
    result = json.load(f)
  entry = {**result["metrics"], "invalid_ids": result["invalid_ids"], "init": result["init"],
           "num_queries": result["num_queries"], "run_dir": run_dir}
  if "metrics_excluding_history" in result:
    entry["excluding_history"] = result["metrics_excluding_history"]
  return entry


def results_table(results: Mapping[str, Any],
                  columns: Sequence[str] = TABLE_COLUMNS) -> str:
  """One row per task x scheme; rec also with the user's earlier items removed ("-earlier")."""
  rows = {}
  for task, schemes in results["tasks"].items():
    for scheme, values in schemes.items():
      rows[f"{task} / {scheme}"] = values
    for scheme, values in schemes.items():
      if "excluding_history" in values:
        rows[f"{task} -earlier / {scheme}"] = {**values["excluding_history"],
                                               "invalid_ids": values["invalid_ids"]}
  return evaluation.format_table(rows, list(columns), row_header="task / scheme")
