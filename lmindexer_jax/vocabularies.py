"""Vocabularies: SentencePiece base vocabularies (trained or given) and the semantic-ID tokens.

T5's SentencePiece layout is kept: pad 0, EOS 1, UNK 2, no BOS, and seqio's `extra_ids`
sentinels at the top of the range, so a model trained here and a Hugging Face T5 folder's
`spiece.model` go through the same code path. `SemanticIdVocabulary` appends the ID tokens
`<id_{position}_{code}>` after the base vocabulary; `IdLayout` owns their offsets.
"""

import bisect
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import io
import os
import re

from absl import logging
import sentencepiece as spm
import seqio
import tensorflow as tf
import tensorflow_text as tf_text

from lmindexer_jax import files

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
  return files.write_bytes(model_path, model.getvalue())


def sentencepiece_vocabulary(
    model_path: str, extra_ids: int = DEFAULT_EXTRA_IDS
) -> seqio.SentencePieceVocabulary:
  """The seqio vocabulary of a SentencePiece file (ours or a T5 folder's `spiece.model`)."""
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
  return seqio.SentencePieceVocabulary(model_path, extra_ids=extra_ids)


def cache_dir() -> str:
  """Where trained vocabularies are cached: `$LMINDEXER_CACHE`, else ~/.cache/lmindexer_jax."""
  return os.environ.get("LMINDEXER_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "lmindexer_jax"
  )


def cached_sentencepiece_vocabulary(
    key: str,
    sentences: Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    seed: int = 0,
    extra_ids: int = DEFAULT_EXTRA_IDS,
) -> seqio.SentencePieceVocabulary:
  """A SentencePiece vocabulary trained once per `key` and then read from the cache.

  Args:
    key: names what the model is trained on (e.g. a hash of a corpus config); together with
      `vocab_size` and `seed` it names the file under `cache_dir()/spm/`.
    sentences: called only when the model is not cached yet.
    vocab_size: SentencePiece pieces, without the seqio `extra_ids`.
    seed: SentencePiece's random seed; training is deterministic for it.
    extra_ids: seqio sentinels appended to the model.

  Returns:
    The vocabulary, built by `sentencepiece_vocabulary` like any given `.model` file.
  """
  digest = hashlib.sha256(f"{key}|{vocab_size}|{seed}".encode()).hexdigest()[:16]
  path = os.path.join(cache_dir(), "spm", f"{digest}.model")
  if not os.path.exists(path):
    logging.info("Training SentencePiece model %s (vocab %d, seed %d).", path, vocab_size, seed)
    train_sentencepiece(sentences(), path, vocab_size, seed=seed)
  return sentencepiece_vocabulary(path, extra_ids=extra_ids)


# ID tokens: `<id_{position}_{code}>`.
ID_TOKEN_PATTERN = r"<id_(\d+)_(\d+)>"
_ID_TOKEN_RE = re.compile(ID_TOKEN_PATTERN)
_ID_TOKEN_TF = r"<id_\d+_\d+>"


def id_token(position: int, code: int) -> str:
  """The string of one ID token, e.g. `<id_0_12>`."""
  return f"<id_{position}_{code}>"


def id_string(codes: Sequence[int]) -> str:
  """The ID string of a tuple of codes: (12, 7, 3) -> `<id_0_12><id_1_7><id_2_3>`."""
  return "".join(id_token(pos, int(code)) for pos, code in enumerate(codes))


@dataclasses.dataclass(frozen=True)
class IdLayout:
  """Where the ID tokens sit after a base vocabulary: the one place that knows the offsets.

  Positions `0 .. len(codebook_sizes) - 1` are the learned positions (one codebook each, sizes
  may differ). If `disambiguation_size > 0`, position `len(codebook_sizes)` is the
  disambiguation (collision counter) position. Position `p` owns the token ids
  `[position_range(p)[0], position_range(p)[1])`, laid out in position order after `base_size`.
  """

  base_size: int
  codebook_sizes: tuple[int, ...]
  disambiguation_size: int = 0

  def __post_init__(self):
    object.__setattr__(self, "codebook_sizes", tuple(int(k) for k in self.codebook_sizes))
    if self.base_size <= 0:
      raise ValueError(f"base_size must be positive, got {self.base_size}")
    if not self.codebook_sizes or any(k <= 0 for k in self.codebook_sizes):
      raise ValueError(f"codebook_sizes must be non-empty and positive: {self.codebook_sizes}")
    if self.disambiguation_size < 0:
      raise ValueError(f"disambiguation_size must be >= 0, got {self.disambiguation_size}")

  @property
  def position_sizes(self) -> tuple[int, ...]:
    """Sizes of all positions, the disambiguation position last (if it has any tokens)."""
    extra = (self.disambiguation_size,) if self.disambiguation_size else ()
    return self.codebook_sizes + extra

  @property
  def num_positions(self) -> int:
    return len(self.position_sizes)

  @property
  def disambiguation_position(self) -> int:
    return len(self.codebook_sizes)

  @property
  def num_id_tokens(self) -> int:
    return sum(self.position_sizes)

  @property
  def vocab_size(self) -> int:
    return self.base_size + self.num_id_tokens

  @functools.cached_property
  def position_starts(self) -> tuple[int, ...]:
    starts, start = [], self.base_size
    for size in self.position_sizes:
      starts.append(start)
      start += size
    return tuple(starts)

  def position_range(self, position: int) -> tuple[int, int]:
    """Token ids `[start, end)` of one position."""
    self._check_position(position)
    start = self.position_starts[position]
    return start, start + self.position_sizes[position]

  def token_id(self, position: int, code: int) -> int:
    self._check_position(position)
    if not 0 <= code < self.position_sizes[position]:
      raise ValueError(
          f"code {code} out of range for position {position} "
          f"(size {self.position_sizes[position]})"
      )
    return self.position_starts[position] + int(code)

  def is_id_token(self, token_id: int) -> bool:
    return self.base_size <= token_id < self.vocab_size

  def code_of(self, token_id: int) -> tuple[int, int]:
    """(position, code) of an ID token id."""
    if not self.is_id_token(token_id):
      raise ValueError(
          f"token id {token_id} is not an ID token [{self.base_size}, {self.vocab_size})"
      )
    position = bisect.bisect_right(self.position_starts, token_id) - 1
    return position, token_id - self.position_starts[position]

  def codes_to_token_ids(self, codes: Sequence[int]) -> tuple[int, ...]:
    """Code `codes[p]` at position `p`, for a prefix or a whole ID."""
    if len(codes) > self.num_positions:
      raise ValueError(f"{len(codes)} codes for {self.num_positions} positions: {tuple(codes)}")
    return tuple(self.token_id(pos, int(code)) for pos, code in enumerate(codes))

  def token_ids_to_codes(self, token_ids: Sequence[int]) -> tuple[int, ...]:
    """The inverse of `codes_to_token_ids`; token `p` must belong to position `p`."""
    codes = []
    for expected, token in enumerate(token_ids):
      position, code = self.code_of(int(token))
      if position != expected:
        raise ValueError(f"token {token} is at position {position}, expected {expected}")
      codes.append(code)
    return tuple(codes)

  def _check_position(self, position: int) -> None:
    if not 0 <= position < self.num_positions:
      raise ValueError(f"position {position} out of range ({self.num_positions} positions)")


class SemanticIdVocabulary(seqio.Vocabulary):
  """A base vocabulary followed by the position-specific ID tokens `<id_{pos}_{code}>`.

  Text and ID tokens mix freely: ID tokens are split out with a regex (Python `re` in `encode`,
  `tf_text.regex_split` in `encode_tf`), the text between them goes through the base
  vocabulary. Decoding writes ID tokens back as `<id_p_c>`, with a space between text and an ID
  and none between consecutive ID tokens. PAD/EOS/UNK are the base vocabulary's.
  """

  def __init__(
      self,
      base_vocabulary: seqio.Vocabulary,
      codebook_sizes: Sequence[int],
      disambiguation_size: int = 0,
  ):
    self._base = base_vocabulary
    self._codebook_sizes = tuple(codebook_sizes)
    self._disambiguation_size = disambiguation_size
    super().__init__(extra_ids=0)

  @functools.cached_property
  def layout(self) -> IdLayout:
    return IdLayout(self._base.vocab_size, self._codebook_sizes, self._disambiguation_size)

  @property
  def base_vocabulary(self) -> seqio.Vocabulary:
    return self._base

  @property
  def eos_id(self) -> int | None:
    return self._base.eos_id

  @property
  def unk_id(self) -> int | None:
    return self._base.unk_id

  @property
  def pad_id(self) -> int:
    return self._base.pad_id

  @property
  def bos_id(self) -> int | None:
    return self._base.bos_id

  @property
  def _base_vocab_size(self) -> int:
    return self.layout.vocab_size

  def codes_to_ids(self, codes: Sequence[int]) -> tuple[int, ...]:
    return self.layout.codes_to_token_ids(codes)

  def ids_to_codes(self, token_ids: Sequence[int]) -> tuple[int, ...]:
    return self.layout.token_ids_to_codes(token_ids)

  def _encode(self, s: str) -> list[int]:
    ids = []
    for i, piece in enumerate(_ID_TOKEN_RE.split(s)):
      # re.split with two groups yields [text, pos, code, text, pos, code, ...].
      kind = i % 3
      if kind == 0 and piece:
        ids.extend(self._base.encode(piece))
      elif kind == 1:
        position = int(piece)
      elif kind == 2:
        ids.append(self.layout.token_id(position, int(piece)))
    return ids

  def _decode(self, ids: Sequence[int]) -> str:
    pieces: list[tuple[bool, str]] = []  # (is_id, text)
    run: list[int] = []

    def flush():
      if run:
        text = self._base.decode(run)
        if text.strip():
          pieces.append((False, text))
        run.clear()

    for token in ids:
      token = int(token)
      if self.layout.is_id_token(token):
        flush()
        pieces.append((True, id_token(*self.layout.code_of(token))))
      else:
        run.append(token)
    flush()
    out = []
    for i, (is_id, text) in enumerate(pieces):
      if i and not (is_id and pieces[i - 1][0]):
        out.append(" ")
      out.append(text)
    return "".join(out)

  @functools.cached_property
  def _token_strings_tf(self) -> tf.Tensor:
    tokens = [
        id_token(pos, code)
        for pos, size in enumerate(self.layout.position_sizes)
        for code in range(size)
    ]
    return tf.constant(tokens)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    s = tf.convert_to_tensor(s, dtype=tf.string)
    scalar = s.shape.rank == 0
    pieces_BxP = tf_text.regex_split(
        tf.reshape(s, [-1]), _ID_TOKEN_TF, keep_delim_regex_pattern=_ID_TOKEN_TF
    )
    pieces = pieces_BxP.flat_values
    is_id = tf.strings.regex_full_match(pieces, _ID_TOKEN_TF)
    # Text pieces go through the base vocabulary; ID pieces encode as "" there.
    text_ids = self._base.encode_tf(tf.where(is_id, "", pieces))
    id_pieces = tf.where(is_id, pieces, "<id_0_0>")
    position = tf.strings.to_number(
        tf.strings.regex_replace(id_pieces, ID_TOKEN_PATTERN, r"\1"), tf.int32
    )
    code = tf.strings.to_number(
        tf.strings.regex_replace(id_pieces, ID_TOKEN_PATTERN, r"\2"), tf.int32
    )
    sizes = tf.constant(self.layout.position_sizes, tf.int32)
    starts = tf.constant(self.layout.position_starts, tf.int32)
    valid_position = position < self.layout.num_positions
    safe_position = tf.where(valid_position, position, 0)
    bad = is_id & ~(valid_position & (code < tf.gather(sizes, safe_position)))
    check = tf.debugging.Assert(
        ~tf.reduce_any(bad),
        ["ID token out of range for layout", str(self.layout), tf.boolean_mask(pieces, bad)],
    )
    with tf.control_dependencies([check]):
      token = tf.gather(starts, safe_position) + code
    id_rows = tf.RaggedTensor.from_row_lengths(
        tf.boolean_mask(token, is_id), tf.cast(is_id, tf.int64)
    )
    per_piece = tf.concat([tf.cast(text_ids, tf.int32), id_rows], axis=1)
    # Regroup the pieces' tokens by input string.
    ids_BxT = tf.RaggedTensor.from_row_splits(
        per_piece.values, tf.gather(per_piece.row_splits, pieces_BxP.row_splits)
    )
    return ids_BxT[0] if scalar else ids_BxT

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids, dtype=tf.int32)
    if ids.shape.rank == 1:
      return self._decode_row_tf(ids)
    return tf.map_fn(self._decode_row_tf, ids, fn_output_signature=tf.string)

  def _decode_row_tf(self, ids_T: tf.Tensor) -> tf.Tensor:
    is_id = ids_T >= self.layout.base_size
    prev_is_id = tf.concat([[True], is_id[:-1]], axis=0)
    # Every ID token is its own segment; base tokens between them form one segment.
    segment = tf.cumsum(tf.cast(is_id | prev_is_id, tf.int32)) - 1
    num_segments = tf.reduce_max(tf.concat([segment, [-1]], axis=0)) + 1  # 0 if ids_T is empty
    runs = tf.RaggedTensor.from_value_rowids(
        tf.where(is_id, self.pad_id, ids_T), segment, nrows=num_segments
    )
    text = self._base._decode_tf(runs)  # pylint: disable=protected-access
    first = tf.gather(ids_T, runs.row_starts())
    seg_is_id = first >= self.layout.base_size
    index = tf.clip_by_value(first - self.layout.base_size, 0, self.layout.num_id_tokens - 1)
    strings = tf.where(seg_is_id, tf.gather(self._token_strings_tf, index), text)
    keep = seg_is_id | (tf.strings.strip(text) != "")
    strings, seg_is_id = tf.boolean_mask(strings, keep), tf.boolean_mask(seg_is_id, keep)
    prev_seg_is_id = tf.concat([[True], seg_is_id[:-1]], axis=0)
    first_seg = tf.range(tf.size(strings)) == 0
    separator = tf.where(first_seg | (seg_is_id & prev_seg_is_id), "", " ")
    return tf.strings.reduce_join(separator + strings)

  def __getstate__(self):
    # Picklable (gin deep-copies configurable arguments): drop the cached TF constant.
    state = self.__dict__.copy()
    state.pop("_token_strings_tf", None)
    return state

  def __eq__(self, other):
    return (
        isinstance(other, SemanticIdVocabulary)
        and self._base == other._base
        and self.layout == other.layout
    )

  def __str__(self) -> str:
    return f"SemanticIdVocabulary(base={self._base}, layout={self.layout})"


class LazyVocabulary(seqio.Vocabulary):
  """A vocabulary resolved at first use by calling `factory()`, and again on every access.

  seqio tasks take their vocabularies when they are registered, at import time; the vocabulary
  of an ID task depends on an ID file that exists only after indexing. `factory` is called on
  each use (cache inside it), so the vocabulary follows whatever the factory reads.
  """

  def __init__(self, factory: Callable[[], seqio.Vocabulary], name: str = ""):
    self._factory = factory
    self._name = name or getattr(factory, "__name__", "vocabulary")
    super().__init__(extra_ids=0)

  def resolve(self) -> seqio.Vocabulary:
    return self._factory()

  @property
  def eos_id(self):
    return self.resolve().eos_id

  @property
  def unk_id(self):
    return self.resolve().unk_id

  @property
  def pad_id(self):
    return self.resolve().pad_id

  @property
  def bos_id(self):
    return self.resolve().bos_id

  @property
  def extra_ids(self) -> int:
    return self.resolve().extra_ids

  @property
  def vocab_size(self) -> int:
    return self.resolve().vocab_size

  @property
  def _base_vocab_size(self) -> int:
    return self.resolve()._base_vocab_size  # pylint: disable=protected-access

  def encode(self, s):
    return self.resolve().encode(s)

  def decode(self, ids):
    return self.resolve().decode(ids)

  def encode_tf(self, s):
    return self.resolve().encode_tf(s)

  def decode_tf(self, ids):
    return self.resolve().decode_tf(ids)

  def _encode(self, s):
    return self.resolve()._encode(s)  # pylint: disable=protected-access

  def _decode(self, ids):
    return self.resolve()._decode(ids)  # pylint: disable=protected-access

  def _encode_tf(self, s):
    return self.resolve()._encode_tf(s)  # pylint: disable=protected-access

  def _decode_tf(self, ids):
    return self.resolve()._decode_tf(ids)  # pylint: disable=protected-access

  def __eq__(self, other):
    if isinstance(other, LazyVocabulary):
      return self._factory == other._factory
    return NotImplemented

  def __hash__(self):
    return hash(self._factory)

  def __str__(self) -> str:
    return f"LazyVocabulary({self._name})"
