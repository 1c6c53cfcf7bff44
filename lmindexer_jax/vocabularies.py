"""Vocabularies: SentencePiece base vocabularies (trained or given) for seqio.

T5's SentencePiece layout is kept: pad 0, EOS 1, UNK 2, no BOS, and seqio's `extra_ids`
sentinels at the top of the range, so a model trained here and a Hugging Face T5 folder's
`spiece.model` go through the same code path.
"""

from collections.abc import Iterable
import io
import os
import tempfile

import seqio
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
DEFAULT_EXTRA_IDS = 100


def train_sentencepiece(
    sentences: Iterable[str],
    model_path: str,
    vocab_size: int,
    *,
    seed: int = 0,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> str:
  """Trains a T5-layout SentencePiece model on `sentences` and writes it to `model_path`.

  Deterministic for a given corpus and seed (one thread, no input sampling). The file is
  written atomically, so a concurrent reader never sees a partial model.

  Returns:
    `model_path`.
  """
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      hard_vocab_limit=False,
      minloglevel=2,
  )
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
    f.write(model.getvalue())
  os.replace(f.name, model_path)
  return model_path


def sentencepiece_vocabulary(
    model_path: str, extra_ids: int = DEFAULT_EXTRA_IDS
) -> seqio.SentencePieceVocabulary:
  """The seqio vocabulary of a SentencePiece file (ours or a T5 folder's `spiece.model`)."""
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
  return seqio.SentencePieceVocabulary(model_path, extra_ids=extra_ids)
