"""The streamed path (Grain over a TFDS ArrayRecord source in C4's schema, built locally).

Resume is by position: a restored iterator yields exactly the batches of an uninterrupted
stream, on one process and on a simulated 2-process pod (where a preempted run resumes to the
same losses); hosts read disjoint documents; a distributed eval over host shards of different
sizes runs the same number of steps on every host and equals a single-process eval.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import seqio

from peer_jax.data import streaming, tasks
from peer_jax.testing import c4_local
from peer_jax.testing.simulated_pod import REPO_ROOT, SimulatedPod, xla_flags

BYTES = seqio.ByteVocabulary()
STEPS = 40  # preemption is agreed within about a second: many fast steps may pass
TIMING_KEYS = ("tokens_per_sec", "step_time_s", "model_flops_per_sec", "mfu", "input_wait_s",
               "checkpoint_blocking_s")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    c4_local.build(d)
    old = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = d
    yield d
    if old is None:
        os.environ.pop("TFDS_DATA_DIR")
    else:
        os.environ["TFDS_DATA_DIR"] = old


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_restored_iterator_continues_the_uninterrupted_stream(tfds_dir):
    it = streaming.GrainBatches("c4_local", "train", 64, BYTES, 8, seed=3)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint holds
    want = [next(it) for _ in range(4)]
    again = streaming.GrainBatches("c4_local", "train", 64, BYTES, 8, seed=3)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(4)]):
        _same(a, b)
    b = want[0]
    assert b["targets"].shape == (8, 64) and b["weights"].sum() > 0
    # inputs are the targets shifted right within each packed segment
    same_seg = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
    np.testing.assert_array_equal(np.where(same_seg, b["targets"][:, :-1], 0), b["inputs"][:, 1:])
    with pytest.raises(ValueError, match="data seed or the number of hosts changed"):
        streaming.GrainBatches("c4_local", "train", 64, BYTES, 8, seed=4).set_state(state)


def test_hosts_read_disjoint_documents(tfds_dir):
    def segments(shard):  # the text of every packed segment, each preceded by "|"
        out = []
        for b in streaming.eval_batches("c4_local", "validation", 64, BYTES, 4, shard_index=shard, num_shards=2):
            for t, seg in zip(b["targets"], b["segment_ids"]):
                for s in np.unique(seg[seg > 0]):
                    out.append(b"|" + bytes(np.asarray(t[(seg == s) & (t > 2)] - 3, np.uint8)))
        return b"".join(out)
    a, b = segments(0), segments(1)
    headers = [doc.split("\n", 1)[0].encode() for doc in tasks.kjv_documents()["validation"]]
    where = [(b"|" + h + b"\n" in a, b"|" + h + b"\n" in b) for h in headers]
    assert all(x != y for x, y in where)  # every document on exactly one host
    assert 25 <= sum(x for x, _ in where) <= 34


def test_a_missing_corpus_names_the_fix(tfds_dir):
    with pytest.raises(FileNotFoundError, match="--file_format=array_record"):
        streaming.GrainBatches("no_such_corpus", "train", 64, BYTES, 8)


# ---- on a simulated pod ---------------------------------------------------------------------


def _args(workdir, *extra):
    return ["--gin_file=configs/runs/tiny_cpu.gin", f"--workdir={workdir}",
            "--gin.transformer.Transformer.num_layers=2", "--gin.transformer.Transformer.d_model=32",
            "--gin.transformer.Transformer.num_heads=2", "--gin.config.TrainConfig.seq_len=64",
            "--gin.config.TrainConfig.batch_size=8", f"--gin.config.TrainConfig.num_steps={STEPS}",
            "--gin.config.TrainConfig.streaming=True", "--gin.config.TrainConfig.train_task='tfds:c4_local'",
            "--gin.config.TrainConfig.eval_tasks=['tfds:c4_local']", "--gin.config.TrainConfig.eval_batches=None",
            "--gin.config.TrainConfig.log_every=1", f"--gin.config.TrainConfig.eval_every={STEPS}",
            "--gin.config.TrainConfig.checkpoint_every=100", "--gin.config.TrainConfig.progress_bar=False",
            "--gin.config.TrainConfig.vocab_multiple=64", "--gin.optim.make_optimizer.warmup_steps=2",
            "--gin.config.TrainConfig.tensorboard=False", *extra]


def _rows(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_streamed_training_resumes_exactly_and_eval_agrees_on_a_pod(tfds_dir, tmp_path):
    shard_batches = [sum(1 for _ in streaming.eval_batches("c4_local", "validation", 64, BYTES, 4, shard_index=i,
                                                             num_shards=2)) for i in range(2)]
    assert shard_batches[0] != shard_batches[1]  # the hosts' eval shards differ in size
    env = {"TFDS_DATA_DIR": tfds_dir}
    ref, run = tmp_path / "ref", tmp_path / "run"
    with SimulatedPod("peer_jax.train", _args(ref), log_dir=tmp_path / "ref_logs", env=env) as pod:
        assert pod.wait(600) == [0, 0], pod.tails()
    with SimulatedPod("peer_jax.train", _args(run), log_dir=tmp_path / "run_logs", env=env) as pod:
        metrics = run / "metrics.jsonl"
        pod.wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, "step 4")
        pod.signal(1)
        assert pod.wait(120) == [0, 0], pod.tails()
        stop = int(pod.wait_for_log(0, r"SIGTERM: saved a checkpoint at step (\d+)", 5).group(1))
    assert 4 <= stop < STEPS
    with SimulatedPod("peer_jax.train", _args(run), log_dir=tmp_path / "resumed_logs", env=env) as pod:
        assert pod.wait(600) == [0, 0], pod.tails()
        assert f"resumed from step {stop}" in pod.logs(0)
    assert _rows(run) == _rows(ref)  # same batches after the resume: same losses, bit for bit
    # The pod's final eval covered the whole validation split; a single process agrees.
    pod_eval = _rows(ref)[-1]
    eval_args = [a for a in _args(ref) if a.startswith("--gin.")]
    p = subprocess.run([sys.executable, "-m", "peer_jax.eval", "--gin_file=configs/runs/tiny_cpu.gin",
                        f"--checkpoint_dir={ref / 'checkpoints'}", *eval_args], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, **env, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled",
                                                    "XLA_FLAGS": xla_flags(4),
                                                    "PYTHONPATH": str(REPO_ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((ref / "checkpoints" / f"eval_step{STEPS}.json").read_text())["tasks"]["tfds:c4_local"]
    assert one["tokens"] == pod_eval["eval/tfds:c4_local/tokens"] > 0
    np.testing.assert_allclose(one["loss"], pod_eval["eval/tfds:c4_local/loss"], rtol=1e-6)
