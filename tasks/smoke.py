"""`lmindexer.smoke.reverse`: a generated seq2seq task for CPU smoke runs of the trainer.

Inputs are short sequences of made-up words; targets are the same words reversed. A tiny T5
learns it in a few hundred steps, so a falling loss shows the whole stack works.
"""

import functools
import random

import seqio
import tensorflow as tf

from lmindexer_jax import vocabularies

TASK_NAME = "lmindexer.smoke.reverse"
_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "ga", "bi")
_NUM_WORDS = 64
_EXAMPLES = {"train": 20_000, "validation": 500}


@functools.cache
def _words() -> tuple[str, ...]:
  rng = random.Random(0)
  words = set()
  while len(words) < _NUM_WORDS:
    words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))))
  return tuple(sorted(words))


def _examples(split: str) -> list[tuple[str, str]]:
  rng = random.Random(split)
  out = []
  for _ in range(_EXAMPLES[split]):
    seq = [rng.choice(_words()) for _ in range(rng.randint(3, 8))]
    out.append((" ".join(seq), " ".join(reversed(seq))))
  return out


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  del shuffle_files, seed  # One in-memory shard; seqio shuffles examples.
  inputs, targets = zip(*_examples(split), strict=True)
  return tf.data.Dataset.from_tensor_slices({"inputs": list(inputs), "targets": list(targets)})


VOCABULARY = vocabularies.cached_sentencepiece_vocabulary(
    f"smoke:{_words()}", lambda: (s for pair in _examples("train")[:2000] for s in pair),
    vocab_size=128,
    extra_ids=0,
)

seqio.TaskRegistry.add(
    TASK_NAME,
    source=seqio.FunctionDataSource(_dataset_fn, splits=tuple(_EXAMPLES)),
    preprocessors=[
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
    ],
    output_features={
        "inputs": seqio.Feature(VOCABULARY, add_eos=True),
        "targets": seqio.Feature(VOCABULARY, add_eos=True),
    },
)
