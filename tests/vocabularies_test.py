"""Vocabularies: ID layout offsets, ID token round trips (Python and TF), SentencePiece."""

import os
import shutil

import pytest
import seqio
import tensorflow as tf

from lmindexer_jax import vocabularies

SENTENCES = [
    f"{a}{b} {b}{c} {c}{a}{b}. {a}{c} ka{b}" for a in ("ba", "di", "fo", "gu", "ke", "lo", "mi")
    for b in ("na", "pe", "ri", "so", "tu") for c in ("vo", "zi", "sha")
]
TEXT = "bana nana vobana. bavo ka"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("spm") / "test.model")
  vocabularies.train_sentencepiece(SENTENCES, path, vocab_size=64, seed=0)
  return vocabularies.sentencepiece_vocabulary(path)


@pytest.fixture(scope="module")
def vocab(base):
  return vocabularies.SemanticIdVocabulary(base, (4, 16, 2), disambiguation_size=3)


def test_layout_offsets_with_differing_sizes():
  layout = vocabularies.IdLayout(100, (4, 16, 2), disambiguation_size=3)
  assert layout.position_sizes == (4, 16, 2, 3) and layout.num_positions == 4
  assert layout.disambiguation_position == 3
  assert [layout.position_range(p) for p in range(4)] == [
      (100, 104), (104, 120), (120, 122), (122, 125)
  ]
  assert layout.vocab_size == 125
  assert layout.token_id(1, 15) == 119 and layout.code_of(119) == (1, 15)
  assert layout.codes_to_token_ids((3, 0, 1, 2)) == (103, 104, 121, 124)
  assert layout.token_ids_to_codes((103, 104, 121, 124)) == (3, 0, 1, 2)
  assert layout.codes_to_token_ids((3, 0)) == (103, 104)  # A prefix.
  for token in range(100, 125):
    assert layout.token_id(*layout.code_of(token)) == token


def test_layout_errors():
  layout = vocabularies.IdLayout(100, (4, 16))
  assert layout.num_positions == 2  # No disambiguation position until its size is known.
  with pytest.raises(ValueError, match="code 4 out of range for position 0"):
    layout.token_id(0, 4)
  with pytest.raises(ValueError, match="position 2 out of range"):
    layout.token_id(2, 0)
  with pytest.raises(ValueError, match="not an ID token"):
    layout.code_of(99)
  with pytest.raises(ValueError, match="expected 0"):
    layout.token_ids_to_codes((104,))
  with pytest.raises(ValueError, match="positive"):
    vocabularies.IdLayout(100, (4, 0))


def test_vocab_sizes_and_specials(base, vocab):
  assert vocab.vocab_size == base.vocab_size + 4 + 16 + 2 + 3
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.layout.base_size == base.vocab_size
  assert vocab == vocabularies.SemanticIdVocabulary(base, (4, 16, 2), 3)
  assert vocab != vocabularies.SemanticIdVocabulary(base, (4, 16, 2), 4)


@pytest.mark.parametrize(
    "text",
    [
        "<id_0_3><id_1_15><id_2_1><id_3_2>",
        "<id_0_0>",
        TEXT + " <id_0_1><id_1_2>",
        "<id_0_1><id_1_2> " + TEXT + " <id_0_2>. <id_0_3><id_1_0>",
        TEXT,
        "",
    ],
)
def test_encode_decode_round_trip_python_and_tf(vocab, text):
  ids = vocab.encode(text)
  assert list(vocab.encode_tf(tf.constant(text)).numpy()) == ids
  decoded = vocab.decode(ids)
  assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == decoded
  assert vocab.encode(decoded) == ids  # Decoding only normalises whitespace.
  if "<id" in text and not any(c.isspace() for c in text):
    assert decoded == text


def test_codes_to_ids_and_back(vocab):
  ids = vocab.codes_to_ids((3, 15, 1, 2))
  assert list(ids) == vocab.encode("<id_0_3><id_1_15><id_2_1><id_3_2>")
  assert vocab.ids_to_codes(ids) == (3, 15, 1, 2)
  assert vocab.decode([*ids, vocab.eos_id, 0, 0]) == "<id_0_3><id_1_15><id_2_1><id_3_2>"
  assert vocabularies.id_string((3, 15, 1, 2)) == "<id_0_3><id_1_15><id_2_1><id_3_2>"


def test_tf_batches(vocab):
  texts = ["<id_0_1> " + TEXT, "<id_0_2><id_1_3>", TEXT]
  ragged = vocab.encode_tf(tf.constant(texts))
  assert ragged.to_list() == [vocab.encode(t) for t in texts]
  padded = ragged.to_tensor()
  assert [s.decode() for s in vocab.decode_tf(padded).numpy()] == [
      vocab.decode(row) for row in padded.numpy().tolist()
  ]


def test_out_of_range_id_tokens_fail(vocab):
  with pytest.raises(ValueError, match="code 4 out of range"):
    vocab.encode("<id_0_4>")
  with pytest.raises(ValueError, match="position 4 out of range"):
    vocab.encode("<id_4_0>")
  with pytest.raises(tf.errors.InvalidArgumentError, match="<id_1_16>"):
    vocab.encode_tf(tf.constant("ok <id_1_16>"))


def test_sentencepiece_training_is_deterministic(tmp_path):
  a = vocabularies.train_sentencepiece(SENTENCES, str(tmp_path / "a.model"), 64, seed=3)
  b = vocabularies.train_sentencepiece(SENTENCES, str(tmp_path / "b.model"), 64, seed=3)
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()


def test_cached_vocabulary_trains_once(tmp_path, monkeypatch):
  monkeypatch.setenv("LMINDEXER_CACHE", str(tmp_path / "cache"))
  calls = []

  def sentences():
    calls.append(1)
    return SENTENCES

  v1 = vocabularies.cached_sentencepiece_vocabulary("corpus-a", sentences, 64)
  v2 = vocabularies.cached_sentencepiece_vocabulary("corpus-a", sentences, 64)
  assert len(calls) == 1 and v1 == v2
  assert v1.sentencepiece_model_file.startswith(str(tmp_path / "cache"))
  v3 = vocabularies.cached_sentencepiece_vocabulary("corpus-b", sentences, 64)
  assert len(calls) == 2 and v3.sentencepiece_model_file != v1.sentencepiece_model_file


def test_given_model_file_goes_through_the_same_path(base, tmp_path):
  # As a Hugging Face T5 folder holds it: <folder>/spiece.model.
  folder = tmp_path / "t5-folder"
  folder.mkdir()
  shutil.copy(base.sentencepiece_model_file, folder / "spiece.model")
  given = vocabularies.sentencepiece_vocabulary(str(folder / "spiece.model"))
  assert isinstance(given, seqio.SentencePieceVocabulary)
  assert given.vocab_size == base.vocab_size and given.encode(TEXT) == base.encode(TEXT)
  ids = vocabularies.SemanticIdVocabulary(given, (8,))
  assert ids.encode(TEXT + " <id_0_7>")[-1] == given.vocab_size + 7
  with pytest.raises(FileNotFoundError):
    vocabularies.sentencepiece_vocabulary(str(tmp_path / "missing" / "spiece.model"))


def test_lazy_vocabulary_resolves_on_use(vocab):
  calls = []

  def factory():
    calls.append(1)
    return vocab

  lazy = vocabularies.LazyVocabulary(factory, "test")
  assert not calls
  assert lazy.vocab_size == vocab.vocab_size and lazy.eos_id == vocab.eos_id
  assert list(lazy.encode_tf(tf.constant("<id_0_1>")).numpy()) == vocab.encode("<id_0_1>")
  assert lazy.decode(vocab.encode("<id_0_1>")) == "<id_0_1>"
  assert calls and lazy == vocabularies.LazyVocabulary(factory)
  assert os.environ.get("LMINDEXER_CACHE")  # conftest keeps caches out of $HOME.
