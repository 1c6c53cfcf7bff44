r"""K-means over TF-IDF + LSA vectors: the classic baseline for category recovery (AMI).

  .venv/bin/python benchmarks/kmeans_tfidf_baseline.py --dataset=brown
  .venv/bin/python benchmarks/kmeans_tfidf_baseline.py --dataset=womens_clothing_reviews \
    --k=20,32,64 --seeds=0,1,2
  .venv/bin/python benchmarks/kmeans_tfidf_baseline.py --dataset=brown --k=16 --max_tokens=128

Reads the documents the indexer sees: the raw texts of the dataset's index task (`INDEX_TASK` of
`gin/data/<dataset>.gin`), through the task's source, before tokenization. Vectors: TF-IDF
(scikit-learn), TruncatedSVD to `--svd_dim`, then L2-normalised (the usual LSA recipe); k-means
(scikit-learn, k-means++) at each K, once per seed. Prints one JSON line per (K, seed) and one
summary line per K (mean and standard deviation over the seeds) with AMI against the top-level
label (`ami_top`), the full label path (`ami_path`: the tuple of all levels) and each level.
Default K: the dataset's first codebook size (`CODEBOOK_SIZES`) and 64.

`--gin.KEY=VALUE` overrides a binding of the data file (e.g. a real dataset's `max_docs`).
"""

import contextlib
import json
import sys
import time

from absl import flags
import numpy as np
from sklearn import cluster
from sklearn import decomposition
from sklearn import feature_extraction
from sklearn import preprocessing

from lmindexer_jax import metrics

_DATASET = flags.DEFINE_string(
    "dataset", "brown", "A gin/data/<dataset>.gin: brown, womens_clothing_reviews, synthetic, ...")
_K = flags.DEFINE_list("k", [], "K values; default: the first CODEBOOK_SIZES entry and 64.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of SVD and k-means.")
_SVD_DIM = flags.DEFINE_integer("svd_dim", 256, "TruncatedSVD components.")
_N_INIT = flags.DEFINE_integer("n_init", 5, "k-means++ restarts per run (best inertia kept).")
_MIN_DF = flags.DEFINE_integer("min_df", 2, "TF-IDF: ignore terms in fewer documents.")
_MAX_DF = flags.DEFINE_float("max_df", 0.5, "TF-IDF: ignore terms in a larger share of documents.")
# Off: scikit-learn's English list holds content words ("top", "bottom", "front", "back") that
# name clothing categories (AMI .27 -> .23 on womens_clothing_reviews, K = 20); max_df drops the
# most frequent words anyway.
_STOP_WORDS = flags.DEFINE_bool("stop_words", False, "TF-IDF: drop scikit-learn's English list.")
_SUBLINEAR_TF = flags.DEFINE_bool("sublinear_tf", True, "TF-IDF: 1 + log(tf).")
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 0, "Keep what the indexer reads at this MAX_LENGTH: each text's first "
    "max_tokens - 1 pieces of the task's vocabulary (plus EOS), decoded. 0: the whole text.")


def load_documents(task_name: str) -> tuple[list[str], np.ndarray]:
  """Texts and int labels [N, levels] of an index task, in corpus order, from its source."""
  import seqio

  import tasks  # noqa: F401  (registers the task families)

  task = seqio.get_mixture_or_task(task_name)
  ds = task.source.get_dataset(split="train", shuffle=False)
  rows = sorted(ds.as_numpy_iterator(), key=lambda ex: int(ex["doc_index"]))
  texts = [ex["text"].decode("utf-8") for ex in rows]
  labels = np.stack([np.asarray(ex["labels"], np.int64) for ex in rows])
  if _MAX_TOKENS.value:
    vocab = task.output_features["inputs"].vocabulary
    texts = [vocab.decode(vocab.encode(t)[:_MAX_TOKENS.value - 1]) for t in texts]
  return texts, labels


def path_labels(labels_NxLv: np.ndarray) -> np.ndarray:
  """One id per distinct full path (the tuple of all levels); -1 where any level is unknown."""
  known_N = (labels_NxLv >= 0).all(axis=1)
  path_N = np.full(len(labels_NxLv), -1, np.int64)
  if known_N.any():
    _, inverse = np.unique(labels_NxLv[known_N], axis=0, return_inverse=True)
    path_N[known_N] = inverse.reshape(-1)
  return path_N


def lsa_vectors(texts: list[str], svd_dim: int, seed: int) -> tuple[np.ndarray, int]:
  """L2-normalised TruncatedSVD of the TF-IDF matrix (float [N, svd_dim]), and its terms."""
  tfidf = feature_extraction.text.TfidfVectorizer(
      min_df=_MIN_DF.value, max_df=_MAX_DF.value, sublinear_tf=_SUBLINEAR_TF.value,
      stop_words="english" if _STOP_WORDS.value else None)
  x_NxV = tfidf.fit_transform(texts)
  svd = decomposition.TruncatedSVD(n_components=svd_dim, random_state=seed)
  return preprocessing.normalize(svd.fit_transform(x_NxV)), x_NxV.shape[1]


def main(argv: list[str]) -> None:
  del argv
  import gin

  from lmindexer_jax import gin_utils

  gin_utils.parse([f"gin/data/{_DATASET.value}.gin"], flags.FLAGS.gin_bindings,
                  flags.FLAGS.gin_search_paths)
  gin_utils.configure_task_settings()
  task_name = gin.query_parameter("INDEX_TASK/macro.value")
  codebook_sizes = tuple(gin.query_parameter("CODEBOOK_SIZES/macro.value"))
  ks = [int(k) for k in _K.value] or [codebook_sizes[0], 64]

  with contextlib.redirect_stdout(sys.stderr):  # TFDS reports preparing a dataset on stdout.
    texts, labels_NxLv = load_documents(task_name)
  path_N = path_labels(labels_NxLv)
  deepest_N = labels_NxLv[:, -1]
  # The deepest level identifies the path when both partitions are the same.
  deepest_is_path = metrics.ami(deepest_N, path_N) > 1 - 1e-9 and bool(
      ((deepest_N >= 0) == (path_N >= 0)).all())
  common = {"dataset": _DATASET.value, "task": task_name, "num_docs": len(texts),
            "max_tokens": _MAX_TOKENS.value,
            "labelled": int((path_N >= 0).sum()), "levels": int(labels_NxLv.shape[1]),
            "num_top": int(len(set(labels_NxLv[:, 0]) - {-1})),
            "num_paths": int(len(set(path_N) - {-1})), "deepest_level_is_path": deepest_is_path}
  results: dict[int, list[dict]] = {k: [] for k in ks}
  for seed in map(int, _SEEDS.value):
    start = time.time()
    x_NxD, num_terms = lsa_vectors(texts, _SVD_DIM.value, seed)
    lsa_s = time.time() - start
    for k in ks:
      start = time.time()
      km = cluster.KMeans(n_clusters=k, n_init=_N_INIT.value, random_state=seed).fit(x_NxD)
      clusters_N = km.labels_
      row = {
          **common, "k": k, "seed": seed, "terms": num_terms, "svd_dim": _SVD_DIM.value,
          "ami_top": metrics.ami(clusters_N, labels_NxLv[:, 0]),
          "ami_path": metrics.ami(clusters_N, path_N),
          **{f"ami_level_{level + 1}": metrics.ami(clusters_N, labels_NxLv[:, level])
             for level in range(labels_NxLv.shape[1])},
          "lsa_s": round(lsa_s, 2), "kmeans_s": round(time.time() - start, 2),
      }
      results[k].append(row)
      print(json.dumps(row), flush=True)
  for k, rows in results.items():
    summary = {**common, "k": k, "seeds": [r["seed"] for r in rows], "summary": True}
    for key in [key for key in rows[0] if key.startswith("ami_")]:
      values = np.array([r[key] for r in rows])
      summary[key] = round(float(values.mean()), 4)
      summary[f"{key}_std"] = round(float(values.std()), 4)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  from lmindexer_jax import gin_utils

  gin_utils.launch(main)
