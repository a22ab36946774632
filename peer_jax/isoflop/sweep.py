"""Runs an isoFLOP grid: one `python -m peer_jax.train` per point, skipping finished points.

    python scripts/isoflop_sweep.py configs/isoflop/mini --root runs/isoflop_mini [--jobs 1]
    python scripts/isoflop_sweep.py configs/isoflop/paper --root gs://BUCKET/isoflop --print_commands

GRID is a folder written by configs/isoflop/generate.py (its grid.json lists the points) or
that grid.json itself. Each point trains in ROOT/<point name>:

* finished (result.json reports step ≥ the point's num_steps and an eval loss): skipped;
* interrupted (checkpoints, no or an early result.json): rerun with the same workdir, and the
  trainer resumes from its last checkpoint;
* otherwise: started.

The trainer writes operative_config.gin, metrics.jsonl, compile_report.json, checkpoints/ and
result.json (final metrics); this script adds train.log (the child's output) and
summary.json: the grid's entry for the point (budget, method, shape, parameters, FLOPs; as the
grid states them: `gin_overrides` lists the sweep's --gin.* flags that the run applied on top),
status, attempts with their wall times and code version (git HEAD, dirty flag), total wall
time, the final result and the host it trained on (CPU, the ISA XLA:CPU compiled for,
threads, jax/jaxlib/flax versions; `peer_jax.host.describe`). Children get
WANDB_MODE=disabled unless WANDB_MODE is set. SIGINT/SIGTERM is forwarded to the children
(which save a checkpoint and stop), so an interrupted sweep resumes where it stopped.

`--print_commands` prints the commands instead (for a TPU pod: every worker runs the same
`python -m peer_jax.train --distributed ...`; wrap with `--launcher`, e.g.
`--launcher 'gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command={cmd}'`;
`--eval_tasks c4,curation,lambada,pile,wikitext103` adds the post-hoc evals of Table 1).
`--summarize` writes summary.json for points trained that way, once their run directories are
copied under a local ROOT (`gsutil -m rsync -r -x '.*/checkpoints/[0-9]+/.*' gs://BUCKET/isoflop ROOT`
skips the checkpoint steps but keeps checkpoints/eval_step*.json from the post-hoc evals), so
scripts/fit_isoflop.py can read them.
Extra `--gin.NAME=VALUE` arguments are passed to every child.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from peer_jax.gin_utils import REPO_ROOT

STEPS_OVERRIDE = re.compile(r"^--gin\.config\.TrainConfig\.num_steps=(\d+)$")


# ----------------------------------------------------------------------------- grid


def load_points(grid: str | Path) -> list[dict]:
    """The points of a grid folder / grid.json; gin_file paths made absolute."""
    path = Path(grid)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    manifest = path / "grid.json" if path.is_dir() else path
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: generate the grid with configs/isoflop/generate.py")
    points = json.loads(manifest.read_text())["points"]
    for p in points:
        gin = Path(p["gin_file"])
        if not gin.is_absolute():
            local = manifest.parent / gin.name
            gin = local if local.exists() else REPO_ROOT / gin
        p["gin_file"] = str(gin)
    return points


def select(points: list[dict], only: str | None = None, methods: str | None = None,
           budgets: str | None = None) -> list[dict]:
    out = points
    if only:
        out = [p for p in out if re.search(only, p["name"])]
    if methods:
        keep = set(methods.split(","))
        out = [p for p in out if p["method"] in keep]
    if budgets:
        keep_b = [float(b) for b in budgets.split(",")]
        out = [p for p in out if any(abs(p["budget"] / b - 1) < 1e-9 for b in keep_b)]
    return out


def expected_steps(point: dict, gin_args: list[str]) -> int:
    for a in gin_args:
        m = STEPS_OVERRIDE.match(a)
        if m:
            return int(m.group(1))
    return int(point["num_steps"])


# ----------------------------------------------------------------------------- state of a point


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def point_status(workdir: Path, steps: int) -> str:
    """'done', 'no_eval' (trained to the end but the result lacks an eval), 'partial'
    (checkpoints or an early result: resumable) or 'new'."""
    result = _read_json(workdir / "result.json")
    if result is not None and int(result.get("step", -1)) >= steps:
        return "done" if "eval_loss" in result else "no_eval"
    ckpts = workdir / "checkpoints"
    if result is not None or (ckpts.is_dir() and any(ckpts.iterdir())):
        return "partial"
    return "new"


def write_summary(workdir: Path, point: dict, steps: int, attempt: dict | None, gin_args=()) -> dict:
    """Updates workdir/summary.json with one more attempt and the current result; `gin_args`:
    the --gin.* flags this sweep passes on top of the point's gin file (an LR check's peak_lr:
    `point` keeps the grid's value)."""
    path = workdir / "summary.json"
    old = _read_json(path) or {}
    attempts = old.get("attempts", []) + ([attempt] if attempt else [])
    result = _read_json(workdir / "result.json") or {}
    compile_report = _read_json(workdir / "compile_report.json") or {}
    status = point_status(workdir, steps)
    summary = {
        "point": {k: v for k, v in point.items()},
        # what the runs applied: this attempt's flags, else the record (a skip reruns nothing),
        # else the command's (--summarize of runs trained elsewhere with these flags)
        "gin_overrides": list(gin_args) if attempt else old.get("gin_overrides", list(gin_args)),
        "status": status,
        "num_steps": steps,
        "step": result.get("step"),
        # runs launched elsewhere (--summarize) have no attempts here: the trainer's own wall time
        "wall_time_s": sum(a["wall_time_s"] for a in attempts) if attempts else result.get("wall_time_s"),
        "attempts": attempts,
        "result": result,
        "eval": {k: v for k, v in result.items() if k.startswith("eval")},
        "xla_flops_per_step": compile_report.get("flops_per_device_step_xla"),
        # the trainer's record of its machine (peer_jax/host.py): CPU, ISA, threads, versions
        "host": result.get("host") or compile_report.get("host"),
    }
    path.write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------- commands


def train_command(point: dict, workdir: str, gin_args: list[str], *, distributed: bool = False,
                  python: str = sys.executable, module: str = "peer_jax.train") -> list[str]:
    cmd = [python, "-m", module, f"--gin_file={point['gin_file']}", f"--workdir={workdir}"]
    if distributed:
        cmd.insert(3, "--distributed")
    return cmd + list(gin_args)


def code_version() -> dict:
    """The checkout a run used: HEAD and whether tracked files under peer_jax/ or configs/ differ
    from it (a bit-for-bit rerun needs the operative config *and* this code)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "peer_jax", "configs"))}


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


class _Stop:
    """Turns SIGINT/SIGTERM into a flag; the sweep forwards SIGTERM to its children."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_grid(points: list[dict], root: str | Path, *, jobs: int = 1, gin_args: list[str] = (),
             command=train_command, poll_s: float = 0.5, log=print) -> dict[str, str]:
    """Runs every unfinished point (≤ `jobs` at a time); returns {point name: final status}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    todo = []
    statuses = {}
    for p in points:
        workdir = root / p["name"]
        steps = expected_steps(p, gin_args)
        status = point_status(workdir, steps)
        if status == "done":
            statuses[p["name"]] = "done"
            if not (workdir / "summary.json").exists():
                write_summary(workdir, p, steps, None, gin_args)
            log(f"skip   {p['name']} (finished)")
        elif status == "no_eval":
            statuses[p["name"]] = "no_eval"
            write_summary(workdir, p, steps, None, gin_args)
            log(f"skip   {p['name']} (trained to step {steps} but result.json has no eval: rerun its eval)")
        else:
            todo.append((p, steps, status))
    running: dict[str, tuple] = {}
    signalled: set[int] = set()
    env = child_env()
    with _Stop() as stop:
        while (todo or running) and not (stop.requested and not running):
            while todo and len(running) < jobs and not stop.requested:
                p, steps, status = todo.pop(0)
                workdir = root / p["name"]
                workdir.mkdir(parents=True, exist_ok=True)
                logf = open(workdir / "train.log", "a")
                cmd = command(p, str(workdir), list(gin_args))
                logf.write(f"\n$ {shlex.join(cmd)}\n")
                logf.flush()
                # Own session: a terminal's Ctrl-C reaches only this script, which forwards SIGTERM
                # (the trainer's save-and-stop signal) instead of killing children mid-step.
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT),
                                        start_new_session=True)
                running[p["name"]] = (proc, p, steps, time.time(), time.strftime("%Y-%m-%dT%H:%M:%S"), logf, code_version())
                log(f"{'resume' if status == 'partial' else 'start '} {p['name']} ({steps} steps) pid {proc.pid}")
            if stop.requested:
                # Once per child: a second SIGTERM after the trainer left its save-and-stop
                # handler would kill it while it finalises its checkpoint.
                for proc, *_ in running.values():
                    if proc.poll() is None and proc.pid not in signalled:
                        proc.send_signal(signal.SIGTERM)
                        signalled.add(proc.pid)
            time.sleep(poll_s)
            for name in list(running):
                proc, p, steps, t0, started, logf, code = running[name]
                if proc.poll() is None:
                    continue
                logf.close()
                del running[name]
                attempt = {"started": started, "wall_time_s": time.time() - t0, "returncode": proc.returncode,
                           "code": code, "gin_args": list(gin_args)}
                summary = write_summary(root / name, p, steps, attempt, gin_args)
                statuses[name] = summary["status"] if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                log(f"{statuses[name]:6s} {name} step {summary['step']} in {attempt['wall_time_s']:.0f} s "
                    f"eval_loss {summary['eval'].get('eval_loss')}")
    for p, *_ in todo:
        statuses[p["name"]] = "not started"
    (root / "sweep.json").write_text(json.dumps(statuses, indent=1))
    return statuses


def print_commands(points: list[dict], root: str, gin_args: list[str], launcher: str | None,
                   eval_tasks: str | None = None, log=print) -> None:
    log("# Run each command on every worker of the TPU pod (same command everywhere; "
        "python -m peer_jax.train --distributed). Finished points are left out when ROOT is local.")
    for p in points:
        workdir = f"{root.rstrip('/')}/{p['name']}"
        if "://" not in root and point_status(Path(workdir), expected_steps(p, gin_args)) == "done":
            continue
        gin = os.path.relpath(p["gin_file"], REPO_ROOT) if p["gin_file"].startswith(str(REPO_ROOT)) else p["gin_file"]
        cmd = shlex.join(train_command({**p, "gin_file": gin}, workdir, gin_args, distributed=True, python="python"))
        cmd = f"WANDB_MODE=${{WANDB_MODE:-disabled}} {cmd}"
        steps = expected_steps(p, gin_args)
        flops_note = (f"{p.get('realised_flops', 0):.4g} FLOPs" if steps == p["num_steps"]
                      else f"num_steps overridden (grid: {p['num_steps']})")
        log(f"# {p['name']}: {steps} steps, {flops_note}")
        log(launcher.replace("{cmd}", shlex.quote(cmd)) if launcher else cmd)
        if eval_tasks:  # Table 1's further eval sets, on the final checkpoint (read by fit_isoflop.py)
            ev = shlex.join(["python", "-m", "peer_jax.eval", "--distributed", f"--gin_file={gin}",
                             f"--checkpoint_dir={workdir}/checkpoints", f"--tasks={eval_tasks}", *gin_args])
            ev = f"WANDB_MODE=${{WANDB_MODE:-disabled}} {ev}"
            log(launcher.replace("{cmd}", shlex.quote(ev)) if launcher else ev)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gin_args = [a for a in argv if a.startswith("--gin.")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Extra --gin.NAME=VALUE arguments are passed to every run.")
    p.add_argument("grid", help="grid folder (configs/isoflop/<grid>) or its grid.json")
    p.add_argument("--root", required=True, help="parent folder of the run directories")
    p.add_argument("--jobs", type=int, default=1, help="points trained at once (CPU: 1; each uses every core)")
    p.add_argument("--only", help="regex on point names")
    p.add_argument("--methods", help="comma-separated methods, e.g. dense,peer")
    p.add_argument("--budgets", help="comma-separated budgets, e.g. 5e12")
    p.add_argument("--print_commands", action="store_true", help="print the commands (TPU pod) instead of running")
    p.add_argument("--launcher", help="with --print_commands: template wrapping each command, {cmd} = the command")
    p.add_argument("--eval_tasks", help="with --print_commands: also print a `python -m peer_jax.eval "
                   "--tasks=...` per point, e.g. c4,curation,lambada,pile,wikitext103 (Table 1)")
    p.add_argument("--list", action="store_true", help="list points and their status, run nothing")
    p.add_argument("--summarize", action="store_true",
                   help="write summary.json for points trained elsewhere (e.g. on a pod), run nothing")
    args = p.parse_args([a for a in argv if not a.startswith("--gin.")])
    points = select(load_points(args.grid), args.only, args.methods, args.budgets)
    if not points:
        print("no points selected", file=sys.stderr)
        return 2
    if args.print_commands:
        print_commands(points, args.root, gin_args, args.launcher, args.eval_tasks)
        return 0
    if args.summarize:
        found = 0
        for pt in points:
            workdir = Path(args.root) / pt["name"]
            if (workdir / "result.json").exists():
                s = write_summary(workdir, pt, expected_steps(pt, gin_args), None, gin_args)
                found += 1
                print(f"{pt['name']:34s} {s['status']}")
        print(f"{found}/{len(points)} points have a result.json under {args.root}")
        return 0 if found else 1
    if args.list:
        for pt in points:
            st = point_status(Path(args.root) / pt["name"], expected_steps(pt, gin_args))
            print(f"{pt['name']:34s} {pt['num_steps']:>8d} steps  {st}")
        return 0
    statuses = run_grid(points, args.root, jobs=max(1, args.jobs), gin_args=gin_args)
    bad = {k: v for k, v in statuses.items() if v != "done"}
    print(f"{len(statuses) - len(bad)}/{len(statuses)} points done" + (f"; not done: {bad}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
