"""Pod resilience on a simulated pod (2 processes × 2 CPU devices, gloo), measured.

    python benchmarks/pod_resilience.py [--out benchmarks/results/pod_resilience.json] [--only NAME,...]

* `staggered_sigterm`: SIGTERM to host 0, then host 1 two seconds later; seconds from the
  first signal until both processes have exited (0, one checkpoint at the agreed step).
* `killed_host`: SIGKILL of host 1; seconds until host 0 exits (status 4, naming host 1), for
  `--host_timeout_s` 10 and the default (30).
* `streamed_resume`: the Grain iterator over a local C4-schema ArrayRecord set: seconds to
  build it and restore the state saved at step k (then read one batch), against reading k
  batches from the start (what a replay costs), for k up to one epoch and beyond.
* `save_stall`: one process, a 13 M-parameter model (160 MB of state with Adam), a checkpoint
  every 10 steps: the median step time, the time of the step right after each save, and what
  the `save` call itself blocked for (`checkpoint_blocking_s`), with synchronous and
  asynchronous (default) orbax saves, in one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer_jax.testing.simulated_pod import SimulatedPod  # noqa: E402

TINY = ["--gin_file=configs/runs/tiny_cpu.gin", "--gin.transformer.Transformer.num_layers=2",
        "--gin.transformer.Transformer.d_model=32", "--gin.transformer.Transformer.num_heads=2",
        "--gin.config.TrainConfig.seq_len=64", "--gin.config.TrainConfig.batch_size=8",
        "--gin.config.TrainConfig.log_every=1", "--gin.config.TrainConfig.eval_every=0",
        "--gin.config.TrainConfig.checkpoint_every=50", "--gin.config.TrainConfig.progress_bar=False",
        "--gin.config.TrainConfig.vocab_multiple=64", "--gin.config.TrainConfig.num_steps=100000"]


def _rows(workdir: Path) -> int:
    f = workdir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def staggered_sigterm(tmp: Path) -> dict:
    run = tmp / "staggered"
    with SimulatedPod("peer_jax.train", TINY + [f"--workdir={run}"], log_dir=tmp / "staggered_logs") as pod:
        pod.wait_until(lambda: _rows(run) >= 20, "step 20", 600)
        t0 = time.monotonic()
        pod.signal(0)
        time.sleep(2.0)
        pod.signal(1)
        codes = pod.wait(300)
        took = time.monotonic() - t0
        stops = [pod.wait_for_log(i, r"saved a checkpoint at step (\d+) and stopped", 5).group(1) for i in range(2)]
    return {"exit_codes": codes, "stop_steps": [int(s) for s in stops], "seconds_from_first_sigterm_to_exit": took}


def killed_host(tmp: Path, host_timeout_s: float | None) -> dict:
    run = tmp / f"killed_{host_timeout_s}"
    with SimulatedPod("peer_jax.train", TINY + [f"--workdir={run}"], log_dir=tmp / f"killed_{host_timeout_s}_logs",
                      host_timeout_s=host_timeout_s) as pod:
        pod.wait_until(lambda: _rows(run) >= 20, "step 20", 600)
        t0 = time.monotonic()
        pod.signal(1, signal.SIGKILL)
        pod.procs[0].wait(timeout=600)
        took = time.monotonic() - t0
        named = "lost a host: process 1" in pod.logs(0)
        code = pod.procs[0].returncode
    return {"host_timeout_s": host_timeout_s or 30.0, "survivor_exit_code": code, "names_lost_host": named,
            "seconds_to_survivor_exit": took}


def streamed_resume(tmp: Path, steps=(0, 100, 1000, 5000, 20000)) -> dict:
    data = str(tmp / "tfds")
    from peer_jax.testing import c4_local

    c4_local.build(data, copies=2)
    os.environ["TFDS_DATA_DIR"] = data
    import seqio

    from peer_jax.data import streaming

    vocab, rows = seqio.ByteVocabulary(), []
    it = streaming.GrainBatches("c4_local", "train", 128, vocab, 16, seed=0)
    states, done, t_read = {}, 0, {}
    t0 = time.perf_counter()
    for k in sorted(steps):
        while done < k:
            next(it)
            done += 1
        t_read[k] = time.perf_counter() - t0  # reading k batches from the start: what a replay costs
        states[k] = json.loads(json.dumps(it.get_state()))
    epoch_docs = len(streaming.data_source("c4_local", "train"))
    for k in sorted(steps):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            again = streaming.GrainBatches("c4_local", "train", 128, vocab, 16, seed=0)
            again.set_state(states[k])
            next(again)
            times.append(time.perf_counter() - t)
        rows.append({"step": k, "documents_read": states[k]["grain"]["parent"]["parent"]["next_index"],
                     "restore_s": statistics.median(times), "restore_s_all": times, "replay_s": t_read[k]})
    return {"train_documents": epoch_docs, "batch": "16 x 128 bytes", "rows": rows}


def save_stall(tmp: Path) -> dict:
    out = {}
    for mode in ("sync", "async"):
        run = tmp / f"save_{mode}"
        args = [sys.executable, "-m", "peer_jax.train", "--gin_file=configs/runs/tiny_cpu.gin", f"--workdir={run}",
                "--gin.transformer.Transformer.num_layers=4", "--gin.transformer.Transformer.d_model=512",
                "--gin.transformer.Transformer.num_heads=8", "--gin.config.TrainConfig.seq_len=32",
                "--gin.config.TrainConfig.batch_size=4", "--gin.config.TrainConfig.num_steps=60",
                "--gin.config.TrainConfig.log_every=1", "--gin.config.TrainConfig.eval_every=0",
                "--gin.config.TrainConfig.checkpoint_every=10", "--gin.config.TrainConfig.progress_bar=False",
                f"--gin.config.TrainConfig.async_checkpointing={mode == 'async'}"]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
        p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        times = {r["step"]: r["step_time_s"] for r in rows if "step_time_s" in r}
        after_save = [times[s] for s in times if s > 10 and (s - 1) % 10 == 0]  # the step that follows a save
        others = [times[s] for s in times if s > 10 and (s - 1) % 10 != 0]
        params = json.loads((run / "compile_report.json").read_text())["params"]
        blocking = [r["checkpoint_blocking_s"] for r in rows if "checkpoint_blocking_s" in r and r["step"] > 10]
        out[mode] = {"params": params, "median_step_s": statistics.median(others),
                     "median_step_after_save_s": statistics.median(after_save),
                     "stall_s": statistics.median(after_save) - statistics.median(others),
                     "median_save_blocking_s": statistics.median(blocking)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pod_resilience.json"))
    p.add_argument("--only", default="staggered_sigterm,killed_host,streamed_resume,save_stall")
    p.add_argument("--logs", default=None, help="keep the simulated pods' logs here (default: a temporary folder)")
    a = p.parse_args()
    only = set(a.only.split(","))
    res = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(a.logs or d)
        if "staggered_sigterm" in only:
            res["staggered_sigterm"] = staggered_sigterm(tmp)
        if "killed_host" in only:
            res["killed_host"] = [killed_host(tmp, 10.0), killed_host(tmp, None)]
        if "streamed_resume" in only:
            res["streamed_resume"] = streamed_resume(tmp)
        if "save_stall" in only:
            res["save_stall"] = save_stall(tmp)
    res["load_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    if "staggered_sigterm" in res:
        r = res["staggered_sigterm"]
        print(f"staggered SIGTERM (host 0, then host 1 after 2 s): exit codes {r['exit_codes']}, stopped at steps "
              f"{r['stop_steps']}, {r['seconds_from_first_sigterm_to_exit']:.1f} s from the first signal to exit")
    for r in res.get("killed_host", []):
        print(f"SIGKILL of host 1, host_timeout_s={r['host_timeout_s']:g}: survivor exit {r['survivor_exit_code']} after "
              f"{r['seconds_to_survivor_exit']:.1f} s, names the lost host: {r['names_lost_host']}")
    if "streamed_resume" in res:
        print(f"\nstreamed resume ({res['streamed_resume']['train_documents']} train documents, "
              f"{res['streamed_resume']['batch']} per step)")
        print(f"{'step':>8} {'documents read':>15} {'restore (s)':>12} {'replay (s)':>11}")
        for r in res["streamed_resume"]["rows"]:
            print(f"{r['step']:>8} {r['documents_read']:>15} {r['restore_s']:>12.3f} {r['replay_s']:>11.2f}")
    if "save_stall" in res:
        print("\nstep time around a save (one process)")
        for mode, r in res["save_stall"].items():
            print(f"  {mode:>5}: {r['params'] / 1e6:.1f} M params, median step {r['median_step_s'] * 1e3:.0f} ms, "
                  f"step after a save {r['median_step_after_save_s'] * 1e3:.0f} ms (stall {r['stall_s'] * 1e3:+.0f} ms), "
                  f"save call blocked {r['median_save_blocking_s'] * 1e3:.0f} ms")
    print(f"\nload average before/after: {res['load_before'][0]:.1f} / {res['load_after'][0]:.1f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
