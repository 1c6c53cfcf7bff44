"""The embedded default corpus: documents from a planted topic hierarchy, generated from a seed.

Each level of the hierarchy (default 8 x 8 x 8 = 512 leaves) gives each of its topics its own
made-up, syllable-built words. A document draws its words from the topics on its path, from
shared Zipfian noise words and a few off-topic words, plus one item-specific word (a product
name) that also starts its title. Lengths are lognormal. The document's path is kept as its
labels, so any test can score learned codes against it (AMI per position).

On top of the documents: retrieval queries written from each document's distinctive words,
product-search queries (item word + leaf/level-2 words), and user histories that walk between
items with topic locality (5-core-like lengths). Nothing is read from disk; the SentencePiece
vocabulary is trained on the texts once and cached (`vocabularies.cache_dir()`).

The default (2048 docs of ~26 words = ~44 SentencePiece tokens, p95 ~70; 1024 users) builds in
about a second and is small enough for a tiny T5 to index and fine-tune on CPU in minutes.
"""

import dataclasses
import functools
import math

import numpy as np

from lmindexer_jax import vocabularies
from tasks import corpus
from tasks import settings

# Bump when generation changes, so cached vocabularies of older corpora are not reused.
GENERATOR_VERSION = 1

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "", "n", "r", "s", "l")


@settings.config_class
@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Sizes and noise of the synthetic corpus; the same config always gives the same corpus.

  Attributes:
    num_docs: number of documents.
    branching: children per node at each level of the topic tree (leaves = product).
    words_per_topic: vocabulary size of one topic at each level.
    num_noise_words: shared function/noise words (Zipfian frequencies).
    noise_ratio: share of body words that are noise words.
    off_topic_ratio: share of body words taken from a random other topic.
    level_weights: how the remaining (topic) words split over the levels, top first.
    doc_length_median, doc_length_sigma, doc_length_range: lognormal body length in words.
    title_words: words in a title (the item word plus leaf/level-2 words).
    topic_concentration: Dirichlet concentration of topic sizes (large = balanced tree).
    queries_per_doc: retrieval queries per document (before de-duplication).
    query_length_range: words per retrieval query (inclusive).
    search_queries_per_doc: product-search queries per document.
    split_fractions: train/validation/test shares of the queries.
    num_users: user histories.
    history_length_median, history_length_sigma, history_length_range: lognormal lengths.
    locality: probability that the next item comes from the current item's leaf, its level-2
      subtree, its level-1 subtree (deepest first, one per level); otherwise from anywhere.
    popularity_exponent: Zipf exponent of item popularity in the histories.
    vocab_size: SentencePiece pieces of the corpus vocabulary (without extra ids).
    seed: the one seed of everything above.
  """

  num_docs: int = 2048
  branching: tuple[int, ...] = (8, 8, 8)
  words_per_topic: tuple[int, ...] = (24, 12, 6)
  num_noise_words: int = 150
  noise_ratio: float = 0.3
  off_topic_ratio: float = 0.05
  level_weights: tuple[float, ...] = (0.3, 0.3, 0.4)
  doc_length_median: float = 20.0
  doc_length_sigma: float = 0.35
  doc_length_range: tuple[int, int] = (10, 64)
  title_words: int = 3
  topic_concentration: float = 4.0
  queries_per_doc: int = 4
  query_length_range: tuple[int, int] = (3, 6)
  search_queries_per_doc: int = 2
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  num_users: int = 1024
  history_length_median: float = 8.0
  history_length_sigma: float = 0.5
  history_length_range: tuple[int, int] = (5, 50)
  locality: tuple[float, ...] = (0.5, 0.3, 0.1)
  popularity_exponent: float = 0.8
  vocab_size: int = 2000
  seed: int = 0

  def __post_init__(self):
    # Lists (e.g. from gin) become tuples: the config must be hashable (it keys the caches).
    for field in dataclasses.fields(self):
      if isinstance(getattr(self, field.name), list):
        object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
    levels = len(self.branching)
    for field in ("words_per_topic", "level_weights", "locality"):
      if len(getattr(self, field)) != levels:
        raise ValueError(f"{field} needs one value per level ({levels}): {getattr(self, field)}")
    if self.num_docs < 1 or min(self.branching) < 1 or min(self.words_per_topic) < 1:
      raise ValueError(f"num_docs, branching and words_per_topic must be positive: {self}")
    if sum(self.locality) > 1 or min(self.locality) < 0:
      raise ValueError(f"locality must be probabilities summing to <= 1: {self.locality}")
    if not math.isclose(sum(self.split_fractions), 1.0):
      raise ValueError(f"split_fractions must sum to 1: {self.split_fractions}")
    if self.noise_ratio + self.off_topic_ratio >= 1:
      raise ValueError("noise_ratio + off_topic_ratio must be < 1")
    if self.history_length_range[0] < 3:
      raise ValueError("histories need at least 3 items (train, validation, test targets)")

  @property
  def num_levels(self) -> int:
    return len(self.branching)


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticCorpus:
  """A generated corpus. Rows of every per-document field follow corpus order.

  Attributes:
    labels: int32 [N, num_levels]: the global node id of the document's topic at each level
      (level l has prod(branching[:l+1]) nodes), i.e. its category path.
    item_words: the document's item-specific word.
    histories: per user, the doc indices of the visited items in time order.
    topic_words: [level][node] -> that topic's words.
  """

  config: CorpusConfig
  doc_ids: tuple[str, ...]
  titles: tuple[str, ...]
  texts: tuple[str, ...]
  labels: np.ndarray
  item_words: tuple[str, ...]
  queries: dict[str, tuple[corpus.Query, ...]]
  search_queries: dict[str, tuple[corpus.Query, ...]]
  histories: tuple[tuple[int, ...], ...]
  topic_words: tuple[tuple[tuple[str, ...], ...], ...]
  noise_words: tuple[str, ...]

  @property
  def planted_codes(self) -> np.ndarray:
    """int32 [N, num_levels]: the child index at each level, an oracle semantic ID."""
    return self.labels % np.asarray(self.config.branching, np.int32)


def _words(rng: np.random.Generator, count: int, syllables: tuple[int, int], taken: set) -> list:
  """`count` new pronounceable words of `syllables` (min, max) syllables, unique in `taken`."""
  out = []
  while len(out) < count:
    n = rng.integers(syllables[0], syllables[1] + 1)
    word = "".join(
        _ONSETS[rng.integers(len(_ONSETS))]
        + _VOWELS[rng.integers(len(_VOWELS))]
        + _CODAS[rng.integers(len(_CODAS))]
        for _ in range(n)
    )
    if word not in taken:
      taken.add(word)
      out.append(word)
  return out


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
  weights = 1.0 / np.arange(1, n + 1) ** exponent
  return np.cumsum(weights) / weights.sum()


def _draw(rng: np.random.Generator, cdf: np.ndarray, size=None):
  return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def _top_k_weighted(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
  """k indices sampled without replacement, proportional to weights (Gumbel top-k)."""
  keys = np.log(weights) + rng.gumbel(size=len(weights))
  return np.argsort(-keys, kind="stable")[:k]


@functools.lru_cache(maxsize=4)
def build(config: CorpusConfig) -> SyntheticCorpus:
  """Generates the corpus of `config` (cached per config)."""
  rng = np.random.default_rng(config.seed)
  levels = config.num_levels
  nodes_per_level = np.cumprod(config.branching).tolist()
  num_leaves = nodes_per_level[-1]

  # Vocabularies: noise words, then each level's topics, then one item word per document.
  taken: set = set()
  noise_words = tuple(_words(rng, config.num_noise_words, (1, 2), taken))
  topic_words = tuple(
      tuple(tuple(_words(rng, config.words_per_topic[l], (2, 3), taken)) for _ in range(nodes))
      for l, nodes in enumerate(nodes_per_level)
  )
  item_words = tuple(_words(rng, config.num_docs, (3, 4), taken))
  noise_cdf = _zipf_cdf(len(noise_words), 1.0)
  topic_cdfs = [_zipf_cdf(n, 0.7) for n in config.words_per_topic]

  # The tree's topic sizes: Dirichlet child shares at every node; docs pick leaves by them.
  leaf_prob = np.ones(1)
  for b in config.branching:
    shares = rng.dirichlet(np.full(b, config.topic_concentration), size=len(leaf_prob))
    leaf_prob = (leaf_prob[:, None] * shares).reshape(-1)
  leaves = rng.choice(num_leaves, size=config.num_docs, p=leaf_prob / leaf_prob.sum())
  span = [num_leaves // n for n in nodes_per_level]  # leaves under one node of each level
  labels = np.stack([leaves // s for s in span], axis=1).astype(np.int32)

  def topic_word(level: int, node: int) -> str:
    return topic_words[level][node][_draw(rng, topic_cdfs[level])]

  lo, hi = config.doc_length_range
  lengths = np.clip(
      np.round(rng.lognormal(math.log(config.doc_length_median), config.doc_length_sigma,
                             size=config.num_docs)),
      lo, hi,
  ).astype(int)
  level_p = np.asarray(config.level_weights) / sum(config.level_weights)
  # Titles: the item word, then alternately leaf and level-2 words.
  title_levels = [levels - 1 - (i % min(2, levels)) for i in range(config.title_words - 1)]
  titles, texts, doc_words = [], [], []
  for d in range(config.num_docs):
    path = labels[d]
    title = [item_words[d]] + [topic_word(l, path[l]) for l in title_levels]
    n = lengths[d]
    kind = rng.random(n)
    level = rng.choice(levels, size=n, p=level_p)
    off_topic = kind < config.noise_ratio + config.off_topic_ratio
    # The topic node of each word: the document's own, or a random leaf's for off-topic words.
    leaf = np.where(off_topic, rng.integers(num_leaves, size=n), path[-1])
    node = leaf // np.asarray(span)[level]
    word = np.zeros(n, int)
    for l in range(levels):
      at = level == l
      word[at] = _draw(rng, topic_cdfs[l], int(at.sum()))
    noise_idx = _draw(rng, noise_cdf, n)
    body = [
        noise_words[noise_idx[i]]
        if kind[i] < config.noise_ratio
        else topic_words[level[i]][node[i]][word[i]]
        for i in range(n)
    ]
    body.insert(rng.integers(len(body) + 1), item_words[d])
    sentences, i = [], 0
    while i < len(body):
      step = int(rng.integers(6, 13))
      sentences.append(" ".join(body[i : i + step]))
      i += step
    titles.append(" ".join(title))
    texts.append(". ".join([titles[-1], *sentences]) + ".")
    doc_words.append(set(title) | set(body))

  doc_ids = tuple(f"d{d}" for d in range(config.num_docs))
  queries = _queries(rng, config, doc_ids, doc_words, set(noise_words))
  search_queries = _search_queries(rng, config, doc_ids, labels, item_words, topic_words)
  histories = _histories(rng, config, labels)
  return SyntheticCorpus(
      config=config,
      doc_ids=doc_ids,
      titles=tuple(titles),
      texts=tuple(texts),
      labels=labels,
      item_words=item_words,
      queries=queries,
      search_queries=search_queries,
      histories=histories,
      topic_words=topic_words,
      noise_words=noise_words,
  )


def _split_of(rng: np.random.Generator, config: CorpusConfig) -> str:
  cdf = np.cumsum(config.split_fractions)
  return corpus.SPLITS[min(int(np.searchsorted(cdf, rng.random(), side="right")), 2)]


def _queries(rng, config, doc_ids, doc_words, noise) -> dict[str, tuple[corpus.Query, ...]]:
  """Retrieval queries: distinctive words of the document (weighted by idf), de-duplicated."""
  df: dict[str, int] = {}
  for words in doc_words:
    for w in words:
      df[w] = df.get(w, 0) + 1
  out = {split: [] for split in corpus.SPLITS}
  lo, hi = config.query_length_range
  for d, words in enumerate(doc_words):
    candidates = sorted(words - noise)
    idf = np.array([math.log(config.num_docs / df[w]) + 0.1 for w in candidates])
    seen = set()
    for _ in range(config.queries_per_doc):
      k = min(int(rng.integers(lo, hi + 1)), len(candidates))
      picked = tuple(candidates[i] for i in _top_k_weighted(rng, idf, k))
      split = _split_of(rng, config)
      if frozenset(picked) in seen:
        continue
      seen.add(frozenset(picked))
      query_id = f"q{d}_{len(seen) - 1}"
      out[split].append(corpus.Query(query_id, " ".join(picked), (doc_ids[d],)))
  return {split: tuple(qs) for split, qs in out.items()}


def _search_queries(rng, config, doc_ids, labels, item_words, topic_words):
  """Product-search queries: 1-2 leaf/level-2 words and the item word, shuffled."""
  out = {split: [] for split in corpus.SPLITS}
  levels = config.num_levels
  for d in range(config.num_docs):
    pool = [w for l in range(max(0, levels - 2), levels) for w in topic_words[l][labels[d, l]]]
    for k in range(config.search_queries_per_doc):
      words = [pool[i] for i in rng.choice(len(pool), size=int(rng.integers(1, 3)), replace=False)]
      words.insert(rng.integers(len(words) + 1), item_words[d])
      out[_split_of(rng, config)].append(corpus.Query(f"s{d}_{k}", " ".join(words), (doc_ids[d],)))
  return {split: tuple(qs) for split, qs in out.items()}


def _histories(rng, config, labels) -> tuple[tuple[int, ...], ...]:
  """Random walks over items: stay in the current subtree with probability `locality`."""
  n, levels = config.num_docs, config.num_levels
  popularity = 1.0 / (1 + rng.permutation(n)) ** config.popularity_exponent
  # Per level and node: its documents and the cumulative popularity over them.
  members = []
  for l in range(levels):
    order = np.argsort(labels[:, l], kind="stable")
    bounds = np.searchsorted(labels[order, l], np.arange(labels[:, l].max() + 2))
    members.append((order, bounds))
  all_cdf = np.cumsum(popularity) / popularity.sum()

  def sample(level: int | None, current: int) -> int:
    if level is None:
      return int(_draw(rng, all_cdf))
    order, bounds = members[level]
    node = labels[current, level]
    docs = order[bounds[node] : bounds[node + 1]]
    cdf = np.cumsum(popularity[docs])
    pick = np.searchsorted(cdf, rng.random() * cdf[-1], side="right")
    return int(docs[min(pick, len(docs) - 1)])

  # locality[0] is the leaf level, locality[-1] level 1; the rest of the mass jumps anywhere.
  depth_p = np.array([*config.locality, 1 - sum(config.locality)])
  depth_level = [levels - 1 - i for i in range(levels)] + [None]
  lo, hi = config.history_length_range
  lengths = np.clip(
      np.round(rng.lognormal(math.log(config.history_length_median),
                             config.history_length_sigma, size=config.num_users)),
      lo, min(hi, n),
  ).astype(int)
  histories = []
  for length in lengths:
    items = [int(_draw(rng, all_cdf))]
    seen = {items[0]}
    while len(items) < length:
      choice = int(rng.choice(len(depth_p), p=depth_p))
      nxt = None
      # Widen the subtree when it has nothing new (small leaves), up to the whole corpus.
      for level in depth_level[choice:]:
        for _ in range(8):
          candidate = sample(level, items[-1])
          if candidate not in seen:
            nxt = candidate
            break
        if nxt is not None:
          break
      if nxt is None:
        nxt = int(rng.choice(sorted(set(range(n)) - seen)))
      items.append(nxt)
      seen.add(nxt)
    histories.append(tuple(items))
  return tuple(histories)


def vocabulary(config: CorpusConfig):
  """The corpus's SentencePiece vocabulary, trained on its texts once and cached on disk."""
  key = f"synthetic-v{GENERATOR_VERSION}-{config!r}"
  return vocabularies.cached_sentencepiece_vocabulary(
      key, lambda: build(config).texts, config.vocab_size, seed=config.seed
  )


@functools.lru_cache(maxsize=4)
def _source(config: CorpusConfig) -> corpus.CorpusSource:
  c = build(config)
  return corpus.CorpusSource(
      doc_ids=c.doc_ids,
      texts=c.texts,
      vocabulary=vocabulary(config),
      titles=c.titles,
      labels=c.labels,
      queries=c.queries,
      search_queries=c.search_queries,
      sequences=tuple(tuple(c.doc_ids[i] for i in h) for h in c.histories),
      user_ids=tuple(f"u{u}" for u in range(len(c.histories))),
  )


def corpus_source() -> corpus.CorpusSource:
  """The corpus of the active `CorpusConfig` (`settings.get`), as the task family reads it."""
  return _source(settings.get(CorpusConfig))
