"""The synthetic corpus: deterministic, labelled, queries from their documents, local walks."""

import dataclasses
import time

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score

from tasks import corpus
from tasks import synthetic

TINY = synthetic.CorpusConfig(
    num_docs=256, branching=(4, 4, 2), words_per_topic=(12, 8, 4), num_users=64, vocab_size=400
)


@pytest.fixture(scope="module")
def tiny():
  return synthetic.build(TINY)


def test_same_config_same_corpus_and_seed_changes_it(tiny):
  again = synthetic.build.__wrapped__(TINY)  # Bypass the cache.
  assert again is not tiny
  assert again.texts == tiny.texts
  assert again.queries == tiny.queries and again.search_queries == tiny.search_queries
  assert again.histories == tiny.histories
  np.testing.assert_array_equal(again.labels, tiny.labels)
  other = synthetic.build(dataclasses.replace(TINY, seed=1))
  assert other.texts != tiny.texts


def test_tiny_corpus_builds_fast():
  start = time.perf_counter()
  synthetic.build.__wrapped__(TINY)
  assert time.perf_counter() - start < 1.0


def test_labels_are_category_paths(tiny):
  n, levels = len(tiny.doc_ids), len(TINY.branching)
  assert tiny.labels.shape == (n, levels) and tiny.labels.dtype == np.int32
  nodes = np.cumprod(TINY.branching)
  assert (tiny.labels >= 0).all() and (tiny.labels < nodes).all()
  # A node's parent is its label divided by the branching: labels form a tree.
  for l in range(1, levels):
    np.testing.assert_array_equal(tiny.labels[:, l] // TINY.branching[l], tiny.labels[:, l - 1])
  codes = tiny.planted_codes
  assert (codes < np.asarray(TINY.branching)).all()
  # Per-position AMI of the planted codes against the labels: how tests score learned codes.
  assert adjusted_mutual_info_score(tiny.labels[:, 0], codes[:, 0]) == pytest.approx(1.0)
  assert len(set(map(tuple, tiny.labels[:, 0:1].tolist()))) == TINY.branching[0]


def test_documents_are_topical(tiny):
  # Same-leaf documents share far more words than random pairs: the hierarchy is recoverable.
  words = [set(t.replace(".", "").split()) - set(tiny.noise_words) for t in tiny.texts]
  rng = np.random.default_rng(0)
  same, other = [], []
  for _ in range(400):
    a, b = rng.integers(len(words), size=2)
    if a == b:
      continue
    jaccard = len(words[a] & words[b]) / len(words[a] | words[b])
    (same if tiny.labels[a, -1] == tiny.labels[b, -1] else other).append(jaccard)
  leaf = tiny.labels[:, -1]
  for a in range(len(words)):
    mates = np.flatnonzero(leaf == leaf[a])
    for b in mates[mates > a][:2]:
      same.append(len(words[a] & words[b]) / len(words[a] | words[b]))
  assert np.mean(same) > 3 * np.mean(other)


def test_lengths_and_titles(tiny):
  lo, hi = TINY.doc_length_range
  for text, title, item in zip(tiny.texts, tiny.titles, tiny.item_words, strict=True):
    body = text[len(title) + 2 :].replace(".", "").split()
    assert lo + 1 <= len(body) <= hi + 1  # +1: the item word inside the body.
    assert text.startswith(title + ". ")
    assert title.split()[0] == item
  assert len(set(tiny.item_words)) == len(tiny.item_words)


def test_query_words_come_from_their_document(tiny):
  lo, hi = TINY.query_length_range
  for split in corpus.SPLITS:
    for q in tiny.queries[split]:
      (doc_id,) = q.doc_ids
      doc = tiny.texts[tiny.doc_ids.index(doc_id)]
      words = q.text.split()
      assert set(words) <= set(doc.replace(".", "").split()), q
      assert len(words) <= hi and not set(words) & set(tiny.noise_words)


def test_search_queries_name_the_item(tiny):
  for split in corpus.SPLITS:
    for q in tiny.search_queries[split]:
      d = tiny.doc_ids.index(q.doc_ids[0])
      assert tiny.item_words[d] in q.text.split()
      assert 2 <= len(q.text.split()) <= 3


def test_query_splits_are_disjoint_and_sized(tiny):
  for queries in (tiny.queries, tiny.search_queries):
    ids = [set(q.query_id for q in queries[s]) for s in corpus.SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    total = sum(map(len, ids))
    assert len(ids[0]) / total == pytest.approx(TINY.split_fractions[0], abs=0.06)
    assert ids[1] and ids[2]
  # Never the same words twice for one document, so a test query is not a train query.
  texts = {}
  for split in corpus.SPLITS:
    for q in tiny.queries[split]:
      key = (q.doc_ids, frozenset(q.text.split()))
      assert key not in texts
      texts[key] = split


def test_histories_are_5core_like_and_local(tiny):
  lengths = [len(h) for h in tiny.histories]
  assert len(lengths) == TINY.num_users and min(lengths) >= 5
  assert all(len(set(h)) == len(h) for h in tiny.histories)  # No repeated items.
  pairs = np.array([(a, b) for h in tiny.histories for a, b in zip(h[:-1], h[1:], strict=True)])
  labels = tiny.labels
  # Lift over chance of consecutive items sharing a level-1 topic / a leaf. By construction
  # P(same level-1) >= sum(locality) = 0.9 and P(same leaf) ~ locality[0] = 0.5.
  for level, min_lift in ((0, 0.7), (2, 0.3)):
    same = np.mean(labels[pairs[:, 0], level] == labels[pairs[:, 1], level])
    sizes = np.bincount(labels[:, level]) / len(labels)
    chance = float((sizes**2).sum())  # Two random documents share the node.
    lift = (same - chance) / (1 - chance)
    assert lift >= min_lift, (level, same, chance)


def test_config_is_validated():
  with pytest.raises(ValueError, match="one value per level"):
    synthetic.CorpusConfig(branching=(4, 4))
  with pytest.raises(ValueError, match="split_fractions"):
    synthetic.CorpusConfig(split_fractions=(0.5, 0.1, 0.1))
  with pytest.raises(ValueError, match="at least 3"):
    synthetic.CorpusConfig(history_length_range=(2, 10))


def test_default_corpus_size():
  config = synthetic.CorpusConfig()
  c = synthetic.build(config)
  assert len(c.texts) == 2048 and len(np.unique(c.labels[:, -1])) > 400
  words = np.array([len(t.split()) for t in c.texts])
  assert 20 <= words.mean() <= 32 and words.max() <= 80
  assert len(c.histories) == 1024
