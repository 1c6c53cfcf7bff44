r"""Semantic IDs for new documents, from a finished indexer run (for corpora that grow).

  python -m lmindexer_jax.assign --model_dir=runs/index --input=new_docs.tsv \
    --output=runs/index/new_ids.tsv

Input: `doc_id<TAB>text` per line (`.tsv`, or any name not ending in `.jsonl`/`.json`; the text
is the rest of the line, blank lines and lines starting with `#` are skipped), or JSON lines
(`.jsonl`/`.json`) with string fields `doc_id` and `text`. A bad line stops with one error
naming the file, the line and the field (`DocumentFileError`); so does a doc id that already has
an ID in the run's `semantic_ids.tsv`.

Codes are assigned exactly as the pipeline's assign stages did (`index_pipeline.index`): the
documents are tokenized with the run's base vocabulary and length, and for each position t the
parameters of the stage that assigned c_t (`quantized_t`) encode them with the decoder fed the
codes already chosen; c_t = argmax of h_t scored against that stage's codebook E_t. So a corpus
document given again gets back the codes it has in the ID file.

Disambiguation: a new document whose semantic codes equal existing documents' gets the next code
after the largest one used in that group (never a deleted document's code); new documents of the
same group are numbered in input order. If a group outgrows the ID file's `disambiguation_size`
(models trained on that ID vocabulary have no token for the code), it fails saying so, unless
`--grow_disambiguation`, which writes the larger size in the output's header (the ID vocabulary
then grows: retrain what reads it).

Output: the new documents in the ID file's format (header, one line per document), atomically.
The run must hold `indexer_manifest.json` (`indexer_manifest.write_indexer_manifest`).
"""

from collections.abc import Sequence
import dataclasses
import json
import os

import numpy as np
import seqio
import tensorflow as tf

from lmindexer_jax import index_pipeline
from lmindexer_jax import indexer
from lmindexer_jax import indexer_manifest
from lmindexer_jax import partitioning
from tasks import semantic_ids


class DocumentFileError(ValueError):
  """A bad input document; the message starts with `path:line: field:`."""

  def __init__(self, path: str, line: int | None, field: str, message: str):
    self.path, self.line, self.field = path, line, field
    where = f"{path}:{line}" if line is not None else path
    super().__init__(f"{where}: {field}: {message}")


class DisambiguationOverflowError(ValueError):
  """A group of documents sharing their semantic codes outgrew the disambiguation position."""


@dataclasses.dataclass(frozen=True)
class Document:
  doc_id: str
  text: str
  line: int  # 1-based line in the input file


def _is_jsonl(path: str) -> bool:
  return path.endswith((".jsonl", ".json"))


def read_documents(path: str) -> list[Document]:
  """The documents of a TSV or JSONL file (see the module docstring), checked line by line."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise DocumentFileError(path, None, "file", f"cannot open ({e.strerror})") from None
  jsonl = _is_jsonl(path)
  documents: list[Document] = []
  line_of: dict[str, int] = {}
  with f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
      except UnicodeDecodeError as e:
        raise DocumentFileError(path, number, "line", f"not UTF-8 ({e.reason})") from None
      if not line.strip() or (not jsonl and line.startswith("#")):
        continue
      if jsonl:
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DocumentFileError(path, number, "json", f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
          raise DocumentFileError(path, number, "json", "expected an object {doc_id, text}")
        for field in ("doc_id", "text"):
          if field not in row:
            raise DocumentFileError(path, number, field, "missing")
          if not isinstance(row[field], str):
            raise DocumentFileError(
                path, number, field, f"expected a string, got {type(row[field]).__name__}")
        doc_id, text = row["doc_id"], row["text"]
      else:
        doc_id, sep, text = line.partition("\t")
        if not sep:
          raise DocumentFileError(path, number, "line", f"expected 'doc_id<TAB>text', got {line!r}")
      if not doc_id.strip() or doc_id.startswith("#") or any(c in doc_id for c in "\t\n\r"):
        raise DocumentFileError(
            path, number, "doc_id", f"{doc_id!r} is empty, starts with '#' or has a TAB/newline")
      if doc_id in line_of:
        raise DocumentFileError(
            path, number, "doc_id", f"{doc_id!r} repeats line {line_of[doc_id]}")
      if not text.strip():
        raise DocumentFileError(path, number, "text", f"empty text for {doc_id!r}")
      line_of[doc_id] = number
      documents.append(Document(doc_id, text, number))
  if not documents:
    raise DocumentFileError(path, None, "file", "no documents")
  return documents


def tokenize(texts: Sequence[str], vocabulary: seqio.Vocabulary, max_length: int) -> np.ndarray:
  """int32 [N, max_length] tokens, as the index task makes them (truncated, EOS kept, 0-padded).

  The same seqio steps as the task (`tokenize`, then `append_eos_after_trim` for an `inputs`
  feature with EOS), with the run's vocabulary.
  """
  features = {"inputs": seqio.Feature(vocabulary, add_eos=True)}
  ds = tf.data.Dataset.from_tensor_slices({"inputs": tf.constant(list(texts), tf.string)})
  ds = seqio.preprocessors.tokenize(ds, features, copy_pretokenized=False)
  ds = seqio.preprocessors.append_eos_after_trim(ds, features, {"inputs": max_length})
  ds = ds.padded_batch(1024, padded_shapes={"inputs": [max_length]}, padding_values={"inputs": 0})
  return np.concatenate([b["inputs"] for b in ds.as_numpy_iterator()]).astype(np.int32)


def assign_codes(
    manifest: indexer_manifest.IndexerManifest, tokens_NxL: np.ndarray,
    partitioner: partitioning.Partitioner | None = None,
) -> np.ndarray:
  """int32 [N, C] semantic codes (no disambiguation) of tokenized documents, position by position.

  Position t: the final parameters of `manifest.position_stages[t]` encode h_t with the decoder
  fed c_1..c_(t-1); c_t = argmax of h_t against that stage's codebook E_t.
  """
  if not len(tokens_NxL):
    raise ValueError("no documents to assign")
  partitioner = partitioner or partitioning.Partitioner()
  layout = manifest.layout
  t5_config = manifest.t5_config.replace(vocab_size=layout.vocab_size)
  module = indexer.SemanticIndexer(t5_config, layout, manifest.config)
  codes_NxC = np.zeros((len(tokens_NxL), 0), np.int32)
  for t, stage in enumerate(manifest.position_stages):
    stage_dir = manifest.stage_dir(stage)
    if not os.path.isdir(os.path.join(stage_dir, "checkpoints")):
      raise FileNotFoundError(f"{stage_dir}: no checkpoints of stage {stage} (position {t})")
    params = index_pipeline.final_params(stage_dir)
    codes_N = index_pipeline.assign_position(module, params, t, tokens_NxL, codes_NxC,
                                             partitioner, manifest.eval_batch_size)
    codes_NxC = np.concatenate([codes_NxC, codes_N[:, None]], 1).astype(np.int32)
  return codes_NxC


def disambiguate(
    existing: semantic_ids.SemanticIds, doc_ids: Sequence[str], codes_NxC: np.ndarray,
    *, grow: bool = False,
) -> tuple[np.ndarray, int]:
  """Appends disambiguation codes to new documents' semantic codes, against existing IDs.

  A document gets the code after the largest one its group (same semantic codes) uses, among
  the existing IDs and the new documents before it; a new group starts at 0.

  Returns:
    int32 [N, C + 1] codes and the disambiguation size: the existing one, or (grow) larger.

  Raises:
    DisambiguationOverflowError: a code reaches the existing size and `grow` is False.
  """
  size = existing.disambiguation_size
  if not size:
    raise ValueError("the ID file has no disambiguation position (disambiguation_size 0)")
  num_codes = len(existing.codebook_sizes)
  codes_NxC = np.asarray(codes_NxC, np.int64)
  if codes_NxC.ndim != 2 or codes_NxC.shape[1] != num_codes:
    raise ValueError(f"codes must be [N, {num_codes}], got {codes_NxC.shape}")
  next_code: dict[tuple[int, ...], int] = {}
  for row in existing.codes.tolist():
    key = tuple(row[:num_codes])
    next_code[key] = max(next_code.get(key, 0), row[num_codes] + 1)
  counter_N = np.zeros(len(codes_NxC), np.int64)
  for i, key in enumerate(map(tuple, codes_NxC.tolist())):
    counter_N[i] = next_code.get(key, 0)
    next_code[key] = counter_N[i] + 1
  over_N = counter_N >= size
  if over_N.any() and not grow:
    i = int(np.argmax(over_N))
    raise DisambiguationOverflowError(
        f"{int(over_N.sum())} new documents do not fit their group: e.g. {doc_ids[i]!r} has "
        f"semantic codes {tuple(codes_NxC[i].tolist())}, whose group would need disambiguation "
        f"code {counter_N[i]}, but the ID file's disambiguation_size is {size} (the ID "
        "vocabulary has no token for it); re-run the indexer on the grown corpus, or pass "
        "--grow_disambiguation to write a larger disambiguation_size (then retrain what reads "
        "the IDs)")
  new_size = max(size, int(counter_N.max()) + 1)
  return np.concatenate([codes_NxC, counter_N[:, None]], 1).astype(np.int32), new_size


def assign_file(
    model_dir: str, input_path: str, output_path: str, *, grow_disambiguation: bool = False,
    id_file: str | None = None, partitioner: partitioning.Partitioner | None = None,
) -> semantic_ids.SemanticIds:
  """Reads new documents, assigns their IDs and writes them (`output_path`, the ID file format).

  Args:
    model_dir: a finished indexer run (with `indexer_manifest.json`).
    input_path: the new documents (TSV or JSONL).
    output_path: where their IDs go; never the existing ID file.
    grow_disambiguation: let groups outgrow the existing disambiguation size.
    id_file: the existing IDs; default `model_dir/semantic_ids.tsv`.
    partitioner: the mesh to encode on; all devices, data-parallel, by default.

  Returns:
    The new documents' IDs, as written.
  """
  id_file = id_file or os.path.join(model_dir, semantic_ids.FILE_NAME)
  if os.path.abspath(output_path) == os.path.abspath(id_file):
    raise ValueError(f"--output {output_path!r} is the existing ID file: write the new IDs "
                     "elsewhere")
  manifest = indexer_manifest.read_indexer_manifest(model_dir)
  existing = semantic_ids.read(id_file)
  if existing.codebook_sizes != tuple(manifest.config.codebook_sizes):
    raise ValueError(f"{id_file}: codebook sizes {existing.codebook_sizes}, but the run's are "
                     f"{tuple(manifest.config.codebook_sizes)}")
  documents = read_documents(input_path)
  known = set(existing.doc_ids)
  for doc in documents:
    if doc.doc_id in known:
      raise DocumentFileError(input_path, doc.line, "doc_id",
                              f"{doc.doc_id!r} already has an ID in {id_file}")
  doc_ids = [doc.doc_id for doc in documents]
  tokens_NxL = tokenize([doc.text for doc in documents], manifest.vocabulary(),
                        manifest.max_length)
  codes_NxC = assign_codes(manifest, tokens_NxL, partitioner)
  final_NxC1, size = disambiguate(existing, doc_ids, codes_NxC, grow=grow_disambiguation)
  semantic_ids.write(output_path, doc_ids, final_NxC1, codebook_sizes=existing.codebook_sizes,
                     disambiguation_size=size)
  return semantic_ids.SemanticIds(tuple(doc_ids), final_NxC1, existing.codebook_sizes, size)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags

  values = flags.FLAGS
  for name in ("model_dir", "input", "output"):
    if not values[name].value:
      raise ValueError(f"--{name} is required")
  ids = assign_file(values.model_dir, values.input, values.output,
                    grow_disambiguation=values.grow_disambiguation)
  print(f"[assign] wrote IDs of {len(ids.doc_ids)} documents to {values.output} "
        f"(disambiguation size {ids.disambiguation_size})", flush=True)


if __name__ == "__main__":
  from absl import flags

  from lmindexer_jax import gin_utils

  flags.DEFINE_string("model_dir", "", "A finished indexer run.")
  flags.DEFINE_string("input", "", "New documents: doc_id<TAB>text lines, or JSONL.")
  flags.DEFINE_string("output", "", "Where their IDs go (the ID file format).")
  flags.DEFINE_bool("grow_disambiguation", False,
                    "Let a group outgrow the ID file's disambiguation size (see the docstring).")
  gin_utils.launch(main)
