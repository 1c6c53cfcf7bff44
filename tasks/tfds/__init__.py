"""TFDS builders for LMIndexer's datasets. Importing this package registers them with TFDS.

| builder | configs | splits |
| --- | --- | --- |
| `lmindexer_amazon2014` | beauty, sports_and_outdoors, toys_and_games | corpus, sequences |
| `lmindexer_esci` | us, es, jp, all | corpus, train, test |
| `lmindexer_nq320k` | default | corpus, train, test (validation if dev.csv) |
| `lmindexer_msmarco_passage` | default | corpus, train (validation if dev files) |
| `lmindexer_beir` | default, brown, womens_clothing_reviews | corpus (train/validation/test) |
| `lmindexer_item_sequences` | default, ml100k | corpus, sequences |

The fields of each split kind are listed in `tasks.tfds.common`. Raw files are read from a manual
dir only; bad input raises `tasks.tfds.readers.DataError` (file, line, field). Read splits with
`load_splits`, or hand `dataset_fn(...)` to `seqio.FunctionDataSource`.
"""

from tasks.tfds.amazon2014 import Amazon2014
from tasks.tfds.amazon2014 import AmazonConfig
from tasks.tfds.beir import Beir
from tasks.tfds.common import Config
from tasks.tfds.esci import Esci
from tasks.tfds.esci import EsciConfig
from tasks.tfds.item_sequences import ItemSequences
from tasks.tfds.loading import BUILDERS
from tasks.tfds.loading import dataset_fn
from tasks.tfds.loading import load_splits
from tasks.tfds.loading import prepare
from tasks.tfds.msmarco import MsMarcoPassage
from tasks.tfds.nq320k import Nq320k
from tasks.tfds.readers import DataError

__all__ = [
  "BUILDERS",
  "Amazon2014",
  "AmazonConfig",
  "Beir",
  "Config",
  "DataError",
  "Esci",
  "EsciConfig",
  "ItemSequences",
  "MsMarcoPassage",
  "Nq320k",
  "dataset_fn",
  "load_splits",
  "prepare",
]
