"""The paper's eval sets: C4 validation (tfds) plus four corpora read from local files.

Wikitext-103, the Pile, LAMBADA and Curation Corpus have no maintained tfds builder, so each
is read from `<dir>/<name>/<split>.jsonl` (one JSON object per line with a `text` field),
where `<dir>` is `TrainConfig.eval_data_dir`, by default `$PEER_JAX_EVAL_DATA` (`data_dir`;
it may be a `gs://` path). `python scripts/prepare_eval_data.py --help` says where each set comes from
and converts it to that layout. A missing file stops the run with a message naming the file
and the command that makes it.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from peer_jax.data import tasks

if TYPE_CHECKING:  # imported where a source is built (see peer_jax/data/tasks.py)
    import seqio
    import tensorflow as tf

FILE_TASKS = {
    "wikitext103": "Wikitext-103 (Merity et al.), test split, one article per line",
    "pile": "The Pile (Gao et al.), validation split, a fixed sample of documents",
    "lambada": "LAMBADA (Paperno et al.), test split, one passage per line",
    "curation": "Curation Corpus (Curation 2020), article texts, a fixed sample",
}


def data_dir(configured: str | None = None) -> str:
    """The directory of the file-based eval sets: `configured` (TrainConfig.eval_data_dir), else
    $PEER_JAX_EVAL_DATA, else ~/.cache/peer_jax/eval_data."""
    return configured or os.environ.get("PEER_JAX_EVAL_DATA") or os.path.expanduser("~/.cache/peer_jax/eval_data")


def _jsonl_source(name: str, directory: str) -> seqio.DataSource:
    import seqio
    import tensorflow as tf

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed
        path = os.path.join(directory, name, f"{split}.jsonl")
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(
                f"eval set {name!r}: {path} does not exist. Prepare it with `python scripts/prepare_eval_data.py "
                f"{name} --out {directory}`, or set TrainConfig.eval_data_dir (default: $PEER_JAX_EVAL_DATA) to "
                f"the directory that holds {name}/{split}.jsonl.")
        lines = tf.data.TextLineDataset(path)
        return lines.map(lambda s: {"text": _json_text(s)})

    return seqio.FunctionDataSource(dataset_fn, splits=("validation", "test"))


def _json_text(line: tf.Tensor) -> tf.Tensor:
    """The `text` field of one JSON line (parsed in Python: robust to any escaping)."""
    import tensorflow as tf

    text = tf.py_function(lambda s: json.loads(s.numpy().decode("utf-8"))["text"], [line], tf.string)
    return tf.ensure_shape(text, [])


def register() -> None:
    for name in FILE_TASKS:
        tasks.FILE_SOURCES[name] = (lambda n: (lambda directory: _jsonl_source(n, directory)))(name)


register()
