"""A small TFDS dataset in C4's schema (`text`, `url`, `timestamp`), built locally from KJV.

For tests and measurements of the streamed (Grain + ArrayRecord) path without network:
`build(data_dir)` writes `c4_local/1.0.0` in ArrayRecord format (train: the KJV training
chapters, validation: the starts, of varied length, of the KJV validation chapters), readable as the task
`tfds:c4_local` with `TFDS_DATA_DIR=data_dir`. Pass `copies` to make the train split larger.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from peer_jax.data import tasks

NAME = "c4_local"


class C4Local(tfds.core.GeneratorBasedBuilder):
    """KJV chapters as C4-shaped records."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, copies: int = 1, validation_chars: int | None = 600, **kw):
        self._copies, self._validation_chars = copies, validation_chars
        super().__init__(**kw)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": text, "url": tfds.features.Text(), "timestamp": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        docs = tasks.kjv_documents()
        return {"train": self._generate_examples(docs["train"] * self._copies),
                "validation": self._generate_examples([self._cut(d, i) for i, d in enumerate(docs["validation"])])}

    def _cut(self, doc: str, i: int) -> str:
        """The start of a validation chapter, of varied length (about 0.3–1.7 × validation_chars)."""
        if self._validation_chars is None:
            return doc
        return doc[:int(self._validation_chars * (0.3 + 1.4 * ((i * 37) % 59) / 58))]

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc, "url": f"kjv://{i}", "timestamp": "1611-01-01T00:00:00Z"}


def build(data_dir: str, copies: int = 1, validation_chars: int | None = 600) -> str:
    """Builds the dataset under `data_dir` (idempotent); returns `data_dir`. Validation
    documents are cut to about `validation_chars` characters (varied) so that a whole-split eval
    is quick and the hosts' shards differ in size."""
    builder = C4Local(data_dir=data_dir, file_format="array_record", copies=copies,
                      validation_chars=validation_chars)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return data_dir
