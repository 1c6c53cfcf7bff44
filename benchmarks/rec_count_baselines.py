r"""Count-based reference points for sequential recommendation: popularity and item transitions.

  .venv/bin/python benchmarks/rec_count_baselines.py --dataset=ml100k
  .venv/bin/python benchmarks/rec_count_baselines.py --dataset=ml100k --orders=1,3 --decay=0.5

The comparison's protocol, with no model: the examples of `tasks.corpus.rec_examples` on the
dataset's user sequences (gin/data/<dataset>.gin; leave-last-out), counted on the train split
(every prefix: the validation and test items are never counted), scored on the test split with
`metrics.ir_metrics` over all items, with the user's earlier items kept and removed (the
`metrics` and `metrics_excluding_history` of `lmindexer_jax.eval`). Scorers:
- popularity: how often each item is a training target;
- transitions (order m): item j's score is sum over the m most recent history items h_i (i = 0
  the latest) of decay^i * count(h_i followed by j within the training targets), plus
  popularity / max popularity * 1e-3 to rank the rest (a first-order Markov chain at m = 1).
Ties are broken by item order in the corpus. Prints one JSON line per scorer.

`--gin.KEY=VALUE` overrides a binding of the data file (e.g. `MANUAL_DIR`).
"""

import collections
from collections.abc import Callable
from collections.abc import Sequence
import contextlib
import json
import sys
from typing import Any

from absl import flags
import numpy as np

from lmindexer_jax import metrics

_DATASET = flags.DEFINE_string("dataset", "ml100k", "A gin/data/<dataset>.gin with user sequences.")
_ORDERS = flags.DEFINE_list("orders", ["1", "3"], "History items the transition scorer reads.")
_DECAY = flags.DEFINE_float("decay", 0.5, "Weight of each older history item's transitions.")
_KS = flags.DEFINE_list("ks", ["5", "10", "20"], "Metric cutoffs.")


def _scorers(train: Sequence[Any], doc_index: dict[str, int], orders: list[int],
             decay: float) -> dict[str, Callable[[Sequence[str]], np.ndarray]]:
  """name -> fn(history doc ids, most recent first) -> float [V] scores, from the training
  examples (`corpus.RecExample`s)."""
  num_items = len(doc_index)
  popularity_V = np.zeros(num_items)
  follows = collections.defaultdict(collections.Counter)  # previous item -> {next item: count}
  for ex in train:
    target = doc_index[ex.target]
    popularity_V[target] += 1
    if ex.history:
      follows[doc_index[ex.history[0]]][target] += 1
  tie_break_V = popularity_V / max(popularity_V.max(), 1) * 1e-3

  def transitions(order):
    def score(history):
      scores_V = tie_break_V.copy()
      for i, doc_id in enumerate(history[:order]):
        counter = follows.get(doc_index[doc_id], {})
        scores_V[list(counter)] += decay**i * np.array(list(counter.values()), np.float64)
      return scores_V
    return score

  return {"popularity": lambda history: popularity_V,
          **{f"transitions_order_{m}": transitions(m) for m in orders}}


def main(argv: list[str]) -> None:
  del argv
  from lmindexer_jax import gin_utils
  from tasks import corpus
  from tasks import registration

  gin_utils.parse([f"gin/data/{_DATASET.value}.gin"], flags.FLAGS.gin_bindings,
                  flags.FLAGS.gin_search_paths)
  gin_utils.configure_task_settings()
  with contextlib.redirect_stdout(sys.stderr):  # TFDS reports preparing a dataset on stdout.
    source = registration.corpus_source(_DATASET.value)
  if source.sequences is None:
    raise SystemExit(f"{_DATASET.value} has no user sequences")
  doc_ids = list(source.doc_ids)
  doc_index = {doc_id: i for i, doc_id in enumerate(doc_ids)}
  examples = {split: corpus.rec_examples(source.sequences, split, user_ids=source.user_ids,
                                         train_windows=sys.maxsize, max_history=sys.maxsize)
              for split in ("train", "test")}
  qrels = {ex.user_id: {ex.target: 1} for ex in examples["test"]}
  earlier = {ex.user_id: ex.history for ex in examples["test"]}
  ks = [int(k) for k in _KS.value]
  depth = max(ks) + max(len(h) for h in earlier.values())  # Enough left after removing them.
  scorers = _scorers(examples["train"], doc_index, [int(m) for m in _ORDERS.value], _DECAY.value)
  for name, score in scorers.items():
    run = {}
    for ex in examples["test"]:
      scores_V = score(ex.history)
      top = np.argsort(-scores_V, kind="stable")[:depth]
      run[ex.user_id] = [doc_ids[i] for i in top]
    row = {"dataset": _DATASET.value, "scorer": name, "decay": _DECAY.value,
           "users": len(qrels), "train_examples": len(examples["train"]),
           "earlier_kept": metrics.ir_metrics(run, qrels, ks),
           "earlier_removed": metrics.ir_metrics(run, qrels, ks, exclude=earlier)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  from lmindexer_jax import gin_utils

  gin_utils.launch(main)
