"""Parity with Hugging Face T5: imported checkpoints give the PyTorch outputs, and the seqio
vocabulary of a folder's `spiece.model` gives transformers' T5 tokenizer ids.

Tokenization: both agree on plain text and on whitespace-separated sentinels. They differ when a
sentinel touches text ("a<extra_id_0>", "<extra_id_0>b"): seqio (T5 semantics; the sentinel is
the user-defined piece "▁<extra_id_N>") only recognises a sentinel at a word start and continues
the next word without a new "▁", while HF splits on the sentinel anywhere and starts a new word
after it. `legacy=False` and Metaspace `prepend_scheme='first'` do not reproduce seqio either,
so `test_sentinel_touching_text_is_a_known_difference` pins the difference.
"""

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmindexer_jax import checkpoint_import
from lmindexer_jax import t5
from lmindexer_jax import vocabularies

jax.config.update("jax_numpy_rank_promotion", "raise")

# Different lengths per row, padding 0; decoder inputs start with the start token 0.
ENCODER_TOKENS = np.array([[5, 6, 7, 8, 9, 10, 11, 1],
                           [12, 13, 14, 1, 0, 0, 0, 0],
                           [15, 16, 17, 18, 19, 1, 0, 0]], np.int32)
DECODER_TOKENS = np.array([[0, 20, 21, 22, 23, 1],
                           [0, 30, 31, 1, 0, 0],
                           [0, 40, 41, 42, 0, 0]], np.int32)

_HF_SIZES = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 decoder_start_token_id=0)
# v1_0: relu, tied and rescaled head (safetensors, and a `.bin` state dict that also stores the
# tied copies). v1_1: gated GELU with a separate head, as Hub v1.1 checkpoints.
# v1_1_tied: HF 5.x ties the head even for v1.1 configs (without the rescale).
VARIANTS = ("v1_0", "v1_0_bin", "v1_1", "v1_1_tied")


def _save_hf_t5(path: str, variant: str) -> None:
  torch.manual_seed(0)
  if variant.startswith("v1_0"):
    hf_config = transformers.T5Config(feed_forward_proj="relu", tie_word_embeddings=True,
                                      **_HF_SIZES)
  else:
    hf_config = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                      **_HF_SIZES)
  model = transformers.T5ForConditionalGeneration(hf_config)
  if variant == "v1_1":
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape))
  model.save_pretrained(path)
  if variant == "v1_0_bin":
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))


@pytest.fixture(scope="module", params=VARIANTS)
def imported(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  _save_hf_t5(path, request.param)
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  cfg, params = checkpoint_import.load_checkpoint(path)
  return request.param, hf_model, t5.Transformer(cfg), params


def _hf_forward(hf_model, encoder_tokens, decoder_tokens):
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(encoder_tokens, dtype=torch.long),
                   attention_mask=torch.tensor(encoder_tokens > 0, dtype=torch.long),
                   decoder_input_ids=torch.tensor(decoder_tokens, dtype=torch.long))
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def test_import_picks_the_head(imported):
  variant, _, model, params = imported
  cfg = model.config
  assert cfg.logits_via_embedding == variant.startswith("v1_0")
  assert cfg.mlp_activations == (("relu",) if variant.startswith("v1_0") else ("gelu", "linear"))
  assert ("logits_dense" in params) != cfg.logits_via_embedding


def test_encoder_states_and_logits_match_pytorch(imported):
  _, hf_model, model, params = imported
  hf_encoded, hf_logits = _hf_forward(hf_model, ENCODER_TOKENS, DECODER_TOKENS)
  encoded = model.apply({"params": params}, ENCODER_TOKENS, enable_dropout=False,
                        method=model.encode)
  logits = model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS, enable_dropout=False)
  # Padding positions included: like HF, padding only masks keys.
  np.testing.assert_allclose(np.asarray(encoded), hf_encoded, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=1e-4, rtol=0)


def test_cached_decoding_matches_full_decoding(imported):
  _, _, model, params = imported
  batch, length = DECODER_TOKENS.shape
  encoded = model.apply({"params": params}, ENCODER_TOKENS, enable_dropout=False,
                        method=model.encode)
  full = model.apply({"params": params}, encoded, ENCODER_TOKENS, DECODER_TOKENS,
                     enable_dropout=False, method=model.decode)
  _, variables = model.apply({"params": params}, encoded, ENCODER_TOKENS,
                             jnp.zeros((batch, length), jnp.int32), decode=True,
                             enable_dropout=False, mutable=["cache"], method=model.decode)
  cache, steps = variables["cache"], []
  for i in range(length):
    logits_Bx1xV, variables = model.apply(
        {"params": params, "cache": cache}, encoded, ENCODER_TOKENS, DECODER_TOKENS[:, i:i + 1],
        decode=True, enable_dropout=False, mutable=["cache"], method=model.decode)
    cache = variables["cache"]
    steps.append(logits_Bx1xV)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_relative_position_bucket_matches_hf():
  from transformers.models.t5.modeling_t5 import T5Attention

  relative = np.arange(-1500, 1501)
  for bidirectional in (True, False):
    for num_buckets, max_distance in ((32, 128), (64, 256), (16, 20)):
      hf = T5Attention._relative_position_bucket(
          torch.tensor(relative), bidirectional, num_buckets, max_distance).numpy()
      ours = t5.relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
      np.testing.assert_array_equal(ours, hf)


# ------------------------------ Tokenization ------------------------------------------------

_WORDS = ("the quick brown fox jumps over a lazy dog while Zürich café naïve résumé São Paulo "
          "Ångström déjà vu München Ελλάδα semantic identifier document retrieval index model "
          "don't it's e-mail U.S.A. x-ray co-operate Straße façade Montréal año niño").split()
_PUNCTUATION = list(",.!?;:()\"'-/%$&")


def _sentence(rng: random.Random) -> str:
  tokens = []
  for _ in range(rng.randint(1, 16)):
    r = rng.random()
    if r < 0.12:
      tokens.append(str(rng.randint(0, 10**rng.randint(1, 6))))
    elif r < 0.22:
      tokens.append(rng.choice(_PUNCTUATION))
    else:
      word = rng.choice(_WORDS)
      tokens.append(rng.choice([word, word.upper(), word.capitalize()]))
  # Vary the joins: punctuation glued to words, occasional double spaces.
  text = ""
  for token in tokens:
    text += rng.choice([" ", " ", " ", "", "  "]) + token
  return text.strip() if rng.random() < 0.8 else text


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  rng = random.Random(0)
  folder = str(tmp_path_factory.mktemp("spm"))
  vocabularies.train_sentencepiece([_sentence(rng) for _ in range(400)],
                                   os.path.join(folder, "spiece.model"), vocab_size=500)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "t5"}, f)
  ours = checkpoint_import.load_vocabulary(folder)
  hf = transformers.T5Tokenizer.from_pretrained(folder, extra_ids=100)
  return ours, hf, rng


def _ours_with_eos(vocab, text):
  return list(vocab.encode(text)) + [vocabularies.EOS_ID]


def test_tokenization_matches_hf(tokenizers):
  ours, hf, rng = tokenizers
  assert ours.vocab_size == len(hf) == 600
  texts = [_sentence(rng) for _ in range(300)] + [
      "", "  leading and trailing  ", "tab\tand\nnewline", "ﬁ ligature ① ＡＢＣ ½",
      "unknown 漢字 and emoji 😀", "I like <extra_id_0> sandwiches <extra_id_1> .",
      "<extra_id_99> at the start"]
  mismatches = [(t, _ours_with_eos(ours, t), hf(t)["input_ids"]) for t in texts
                if _ours_with_eos(ours, t) != hf(t)["input_ids"]]
  assert not mismatches, mismatches[:5]
  for i in (0, 1, 99):
    sentinel = f"<extra_id_{i}>"
    assert list(ours.encode(sentinel)) == [hf.convert_tokens_to_ids(sentinel)] == [599 - i]
  assert ours.decode(ours.encode("déjà vu <extra_id_0> Zürich")) == "déjà vu <extra_id_0> Zürich"


def test_sentinel_touching_text_is_a_known_difference(tokenizers):
  ours, hf, _ = tokenizers
  sentinel = hf.convert_tokens_to_ids("<extra_id_0>")
  # Mid-word: not a sentinel for seqio, a sentinel for HF.
  assert sentinel not in ours.encode("a<extra_id_0> b")
  assert sentinel in hf("a<extra_id_0> b")["input_ids"]
  # Text right after a sentinel: seqio continues the word without "▁", HF starts a new word.
  ours_pieces = hf.convert_ids_to_tokens(_ours_with_eos(ours, "a <extra_id_0>b"))
  hf_pieces = hf.convert_ids_to_tokens(hf("a <extra_id_0>b")["input_ids"])
  after = ours_pieces.index("<extra_id_0>") + 1
  assert ours_pieces[:after] == hf_pieces[:after]
  assert not ours_pieces[after].startswith("▁") and hf_pieces[after].startswith("▁")
