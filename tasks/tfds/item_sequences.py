"""TFDS builder `lmindexer_item_sequences`: a catalogue of items plus user histories.

Manual dir (one folder per config):
  items.jsonl       `{"item_id", "text", "category" (optional), "title" (optional)}` per line.
                    `category` is a path string split on '/' or a list of levels.
  sequences.jsonl   `{"user_id", "items": [item ids, oldest first]}` per line.

Splits (fields: `tasks.tfds.common`):
  corpus      doc_id (= item id), doc_index (row in items.jsonl order), title, text, labels.
  sequences   user_id, item_ids: the full history, oldest first (leave-one-out is the task
              layer's job).

Configs: `ml100k` (shared/data/ml100k) and `default` for any other folder. ml100k's `category` is
a '|'-joined genre set, not a path, so it becomes one label (`Animation|Children's|Comedy`).
"""

from __future__ import annotations

from tasks.tfds import common
from tasks.tfds import readers


class ItemSequences(common.Builder):
  """Items (id, text, category) and per-user item histories in time order."""

  name = "lmindexer_item_sequences"
  KINDS = (common.CORPUS, common.SEQUENCES)
  BUILDER_CONFIGS = [
    common.Config(name="default", description="Any folder in the item-sequence layout."),
    common.Config(name="ml100k", description="MovieLens-100K (shared/data/ml100k)."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point manual_dir at the folder itself: items.jsonl and sequences.jsonl (see
  `tasks/tfds/item_sequences.py`). MovieLens-100K in this layout lives in shared/data/ml100k.
  """

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    items_path = readers.require_file(root, "items.jsonl")
    items = readers.Corpus(
      items_path,
      lambda: readers.read_jsonl_documents(
        items_path, id_field="item_id", category_field="category"
      ),
      id_field="item_id",
      text_field="text",
      empty_documents=self.empty_documents,
    )
    sequences = readers.read_sequences(readers.require_file(root, "sequences.jsonl"), items)
    return {
      common.CORPUS: self._corpus_examples(items),
      common.SEQUENCES: self._sequence_examples(sequences),
    }
