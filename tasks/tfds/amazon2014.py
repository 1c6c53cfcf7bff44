"""TFDS builder `lmindexer_amazon2014`: Amazon 2014 reviews as a catalogue plus user histories.

This is the recipe of LMIndexer, P5 and TIGER (reference section 4.1). The source files are
McAuley's 2014 dumps, gzipped or not:
  reviews_{Domain}_5.json   JSON lines: `reviewerID`, `asin`, `unixReviewTime` (others unused).
  meta_{Domain}.json        Python dict literals, one per line (parsed with `ast.literal_eval`,
                            never eval): `asin`, optional `title`, `description`, `brand`, `price`,
                            `categories` (a list of category paths).

Processing: every review counts as an interaction. Duplicate (user, item) pairs are kept, as the
reference keeps them. Each user's items are ordered by `unixReviewTime`, and ties keep file order.
Then users and items with fewer than 5 interactions are dropped, over and over, until none are
left (the 5-core).

Splits (fields: `tasks.tfds.common`):
  corpus      doc_id (= asin), doc_index (rank in meta-file order among the 5-core items, as
              LMIndexer's `meta_all.jsonl`), title, labels (= categories[0]), and text
              `title: ..., description: ..., brand: ..., price: ..., category: c1, c2, ...`
              (fields present only; category = categories[0]).
  sequences   user_id (= reviewerID, first-appearance order), item_ids (asins, oldest first).

Configs: `beauty`, `sports_and_outdoors`, `toys_and_games`. The reference gives 12,101, 18,357
and 11,924 items.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import dataclasses
from typing import Any

from absl import logging
from etils import epath

from tasks.tfds import common
from tasks.tfds import readers

_TEXT_FIELDS = ("title", "description", "brand", "price")


@dataclasses.dataclass(eq=False)
class AmazonConfig(common.Config):
  """Attributes: domain (file-name spelling, e.g. `Sports_and_Outdoors`), core (the k of k-core)."""

  domain: str = "Beauty"
  core: int = 5


def k_core(histories: Mapping[str, list[str]], k: int) -> dict[str, list[str]]:
  """Drops users and items with fewer than `k` interactions until none are left.

  The result (the k-core) does not depend on the order of removal. Histories keep their order.
  """
  current = {user: list(items) for user, items in histories.items()}
  while True:
    item_counts = collections.Counter(item for items in current.values() for item in items)
    kept = {}
    for user, items in current.items():
      if len(items) >= k:
        items = [item for item in items if item_counts[item] >= k]
        if items:
          kept[user] = items
    if sum(map(len, kept.values())) == sum(map(len, current.values())):
      return kept
    current = kept


def _meta_str(rec: Mapping[str, Any], field: str, path: epath.Path, line: int) -> str:
  value = rec.get(field)
  if value is None:
    return ""
  if field == "price" and isinstance(value, int | float) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise readers.DataError(path, line, field, f"expected a string, got {type(value).__name__}")
  return value.strip()


def item_document(rec: Mapping[str, Any], path: epath.Path, line: int) -> readers.Document:
  """The indexer's text of one meta row: `title: ..., description: ..., ..., category: ...`."""
  asin = readers.get_id(rec, "asin", path, line)
  categories = rec.get("categories") or []
  ok = isinstance(categories, list) and all(
    isinstance(p, list) and all(isinstance(c, str) for c in p) for p in categories
  )
  if not ok:
    raise readers.DataError(path, line, "categories", "expected a list of lists of strings")
  category = [c.strip() for c in categories[0] if c.strip()] if categories else []
  values = {field: _meta_str(rec, field, path, line) for field in _TEXT_FIELDS}
  values["category"] = ", ".join(category)
  text = ", ".join(f"{field}: {value}" for field, value in values.items() if value)
  return readers.Document(asin, text, values["title"], tuple(category))


class Amazon2014(common.Builder):
  """Amazon 2014 (McAuley) 5-core reviews and product metadata, one config per domain."""

  name = "lmindexer_amazon2014"
  KINDS = (common.CORPUS, common.SEQUENCES)
  BUILDER_CONFIGS = [
    AmazonConfig(name="beauty", domain="Beauty", description="Beauty; 12,101 items."),
    AmazonConfig(
      name="sports_and_outdoors",
      domain="Sports_and_Outdoors",
      description="Sports and Outdoors; 18,357 items.",
    ),
    AmazonConfig(
      name="toys_and_games",
      domain="Toys_and_Games",
      description="Toys and Games; 11,924 items.",
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://jmcauley.ucsd.edu/data/amazon/index_2014.html download, per domain, the 5-core
  reviews `reviews_{Domain}_5.json.gz` and the metadata `meta_{Domain}.json.gz` (Domain:
  Beauty, Sports_and_Outdoors, Toys_and_Games) into manual_dir; gzipped or unpacked both work.
  """
  HOMEPAGE = "https://jmcauley.ucsd.edu/data/amazon/index_2014.html"
  CITATION = """@inproceedings{he2016ups,
  title={Ups and Downs: Modeling the Visual Evolution of Fashion Trends with One-Class
         Collaborative Filtering},
  author={He, Ruining and McAuley, Julian},
  booktitle={WWW},
  year={2016}}"""

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    root = dl_manager.manual_dir
    reviews_path = readers.require_file(root, f"reviews_{cfg.domain}_5.json")
    meta_path = readers.require_file(root, f"meta_{cfg.domain}.json")

    histories, first_line = _read_reviews(reviews_path)
    core = k_core(histories, cfg.core)
    _log_core(reviews_path, histories, core, cfg.core)
    docs = _read_meta(meta_path, {item for items in core.values() for item in items})
    missing = {item for items in core.values() for item in items} - {d.doc_id for _, d in docs}
    if missing:
      item = min(missing, key=first_line.__getitem__)
      raise readers.DataError(
        reviews_path, first_line[item], "asin", f"item {item!r} has no line in {meta_path.name}"
      )
    catalogue = readers.Corpus(
      meta_path,
      lambda: iter(docs),
      id_field="asin",
      text_field="title",
      empty_documents=self.empty_documents,
    )
    if catalogue.ids.skipped:  # Items without any text: take them out, then redo the k-core.
      trimmed = {u: [i for i in h if i in catalogue.ids] for u, h in core.items()}
      core = k_core(trimmed, cfg.core)
      _log_core(meta_path, trimmed, core, cfg.core)
      kept = {item for items in core.values() for item in items}
      docs = [(line, doc) for line, doc in docs if doc.doc_id in kept]
      catalogue = readers.Corpus(
        meta_path, lambda: iter(docs), id_field="asin", text_field="title", empty_documents="skip"
      )
    return {
      common.CORPUS: self._corpus_examples(catalogue),
      common.SEQUENCES: self._sequence_examples(list(core.items())),
    }


def _read_reviews(path: epath.Path) -> tuple[dict[str, list[str]], dict[str, int]]:
  """Per-user item lists sorted by time (stable), and each item's first line."""
  events: dict[str, list[tuple[int, str]]] = {}
  first_line: dict[str, int] = {}
  for line, rec in readers.iter_jsonl(path):
    user = readers.get_id(rec, "reviewerID", path, line)
    item = readers.get_id(rec, "asin", path, line)
    time = rec.get("unixReviewTime")
    if isinstance(time, bool) or not isinstance(time, int):
      field_state = "missing field" if time is None else f"expected an integer, got {time!r}"
      raise readers.DataError(path, line, "unixReviewTime", field_state)
    events.setdefault(user, []).append((time, item))
    first_line.setdefault(item, line)
  histories = {u: [item for _, item in sorted(ev, key=lambda e: e[0])] for u, ev in events.items()}
  repeats = sum(len(h) - len(set(h)) for h in histories.values())
  if repeats:
    logging.info("%s: %d repeated (user, item) interactions kept", path, repeats)
  return histories, first_line


def _read_meta(path: epath.Path, wanted: set[str]) -> list[tuple[int, readers.Document]]:
  """Documents of the `wanted` items in meta-file order; a repeated asin is a DataError."""
  seen: dict[str, int] = {}
  docs = []
  for line, rec in readers.iter_python_literals(path):
    asin = readers.get_id(rec, "asin", path, line)
    if asin in seen:
      raise readers.DataError(path, line, "asin", f"duplicate asin (first: line {seen[asin]})")
    seen[asin] = line
    if asin in wanted:
      docs.append((line, item_document(rec, path, line)))
  logging.info("%s: %d rows, %d of them in the k-core", path, len(seen), len(docs))
  return docs


def _log_core(path, before: Mapping[str, list[str]], after: Mapping[str, list[str]], k: int):
  def stats(h):
    return len(h), len({i for items in h.values() for i in items}), sum(map(len, h.values()))

  (u0, i0, n0), (u1, i1, n1) = stats(before), stats(after)
  logging.info(
    "%s: %d-core keeps %d of %d users, %d of %d items, %d of %d interactions",
    *(path, k, u1, u0, i1, i0, n1, n0),
  )
