"""Iso-wall-clock view: the interleaved step timing of a grid (benchmarks/isoflop_step_time.py)
and the loss-against-wall-time table and figure (peer_jax.isoflop.wallclock)."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from peer_jax.isoflop import fit, wallclock

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "isoflop_step_time.py"

GIN = """include "configs/base.gin"
include "configs/models/{model}.gin"
from __gin__ import dynamic_registration
from peer_jax.training import config
from peer_jax.models import transformer
{extra}
transformer.Transformer:
  num_layers = 1
  d_model = 16
  num_heads = 1

config.TrainConfig:
  num_steps = {steps}
  batch_size = 4
  seq_len = 32
  eval_tasks = ["kjv"]
  xla_cpu_threads = {threads}
"""
PEER_EXTRA = """from peer_jax.layers import peer
peer.PEER.num_experts = 64
peer.PEER.heads = 1
peer.PEER.top_k = 2
peer.PEER.d_key = 8
"""


def _fake_grid(tmp_path: Path, threads=(1, 1)) -> Path:
    """Two tiny points at one budget (a dense and a PEER one) and a point at another budget."""
    grid = tmp_path / "grid"
    grid.mkdir()
    points = []
    for (name, method, model, extra, steps, budget), t in zip(
            [("dense_1e9_L1_d16_h1", "dense", "dense", "", 50, 1e9),
             ("peer_1e9_L1_d16_h1", "peer", "peer_tiny", PEER_EXTRA, 40, 1e9)], threads):
        (grid / f"{name}.gin").write_text(GIN.format(model=model, extra=extra, steps=steps, threads=t))
        points.append({"name": name, "gin_file": f"{name}.gin", "grid": "fake", "method": method, "budget": budget,
                       "num_layers": 1, "d_model": 16, "num_heads": 1, "num_steps": steps, "tokens_per_step": 128,
                       "params": {k: 1000.0 for k in fit.PARAM_KINDS}, "train_flops_per_token": 1e4})
    other = dict(points[0], name="dense_2e9_L1_d16_h1", budget=2e9)  # another budget: never timed
    (grid / "dense_2e9_L1_d16_h1.gin").write_text((grid / "dense_1e9_L1_d16_h1.gin").read_text())
    other["gin_file"] = "dense_2e9_L1_d16_h1.gin"
    (grid / "grid.json").write_text(json.dumps({"grid": "fake", "points": points + [other]}))
    return grid


def _step_time_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import isoflop_step_time
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return isoflop_step_time


def test_interleaved_timing_runs_every_variant_in_every_round_and_cycles_batches():
    st = _step_time_module()
    calls = []

    def step(name):
        def run(state, batch):
            calls.append((name, batch))
            return state + 1, {}
        return run

    variants = [{"name": "a", "compiled": step("a"), "state": 0, "batches": ["b0", "b1", "b2"]},
                {"name": "b", "compiled": step("b"), "state": 0, "batch": "only"}]
    loads = st.time_interleaved(variants, warmup=1, rounds=3, steps=2)
    assert len(loads) == 3
    warm, timed = calls[:2], calls[2:]
    assert warm == [("a", "b0"), ("b", "only")]
    assert [n for n, _ in timed] == ["a", "a", "b", "b"] * 3  # interleaved: every variant in every round
    assert [b for n, b in timed if n == "a"] == ["b1", "b2", "b0", "b1", "b2", "b0"]
    for v in variants:
        assert [len(r) for r in v["round_times"]] == [2, 2, 2] and v["state"] == 7
        assert v["times"] == [t for r in v["round_times"] for t in r]
    specs = st.variant_specs([{"name": "p", "method": "pkm"}, {"name": "d", "method": "dense"}], ["efficient", "native"])
    assert [(s["name"], s["bindings"]) for s in specs] == [
        ("p/efficient", ['pkm.PKM.compute = "efficient"']), ("p/native", ['pkm.PKM.compute = "native"']), ("d", [])]


@pytest.mark.slow
def test_step_timing_times_every_variant_in_every_round(tmp_path):
    """The script end to end in a fresh process (the points' XLA:CPU pins apply only there)."""
    grid = _fake_grid(tmp_path)
    out = tmp_path / "timing.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, str(SCRIPT), str(grid), "--budget", "1e9", "--rounds", "2", "--steps", "2",
                        "--warmup", "1", "--batches", "2", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    t = json.loads(out.read_text())
    assert t["grid"] == "fake" and t["budget"] == 1e9 and (t["rounds"], t["steps"]) == (2, 2)
    # The points' pins are applied: one XLA:CPU thread, so this process may use one CPU.
    assert t["xla_cpu_threads"] == 1 and t["xla_cpu_pin"] is None and t["host"]["usable_cpus"] == 1
    assert len(t["loadavg_before"]) == 3 and len(t["loadavg_after"]) == 3 and len(t["loadavg_1min_after_round"]) == 2
    assert t["rss_bytes_after_compile"] > 0 and t["peak_rss_bytes"] >= t["rss_bytes_after_compile"]
    names = [v["name"] for v in t["variants"]]
    assert names == ["dense_1e9_L1_d16_h1", "peer_1e9_L1_d16_h1/efficient", "peer_1e9_L1_d16_h1/native"]
    assert [v["compute"] for v in t["variants"]] == [None, "efficient", "native"]
    assert t["variants"][2]["bindings"] == ['peer.PEER.compute = "native"']
    for v in t["variants"]:
        rounds = v["step_s_by_round"]
        assert len(rounds) == 2 and all(len(x) == 2 and all(s > 0 for s in x) for x in rounds)
        flat = [s for x in rounds for s in x]
        assert v["step_s_median"] == pytest.approx(statistics.median(flat))
        assert v["step_s_min"] <= v["step_s_p25"] <= v["step_s_median"] <= v["step_s_p75"] <= v["step_s_max"]
        assert v["step_s_round_medians"] == pytest.approx([statistics.median(x) for x in rounds])
        assert v["predicted_wall_s"] == pytest.approx(v["num_steps"] * v["step_s_median"])
        assert v["compile_s"] > 0 and v["setup_s"] > 0 and v["tokens_per_step"] == 128
    assert "peer_1e9_L1_d16_h1/native" in r.stdout and f"wrote {out}" in r.stdout


def test_step_timing_refuses_points_that_pin_differently(tmp_path):
    from peer_jax.isoflop import sweep

    st = _step_time_module()
    points = [p for p in sweep.load_points(_fake_grid(tmp_path, threads=(1, 2))) if p["budget"] == 1e9]
    with pytest.raises(ValueError, match=r"peer_1e9_L1_d16_h1/efficient sets .*xla_cpu_threads.* separate runs"):
        st.pin_as_points_do(st.variant_specs(points, ["efficient"]))


# ----------------------------------------------------------------------------- the view


def _summary(root: Path, name: str, method: str, loss: float, budget=1e12, params=1e4):
    (root / name).mkdir(parents=True)
    result = {"step": 10, "eval_loss": loss, "eval/kjv/loss": loss, "eval/pydoc/loss": loss + 1}
    (root / name / "summary.json").write_text(json.dumps({
        "status": "done", "result": result, "wall_time_s": 1.0,
        "point": {"name": name, "method": method, "budget": budget, "tokens": 1e6,
                  "params": {k: params for k in fit.PARAM_KINDS}}}))


def _variant(point, method, compute, d, steps, step_s):
    return {"name": point + (f"/{compute}" if compute else ""), "point": point, "method": method, "compute": compute,
            "num_layers": 1, "d_model": d, "num_steps": steps, "step_s_median": step_s,
            "predicted_wall_s": steps * step_s}


def test_wallclock_table_marks_each_methods_best_and_its_time_relative_to_dense(tmp_path):
    shapes = [(16, 1000), (32, 500), (64, 250)]  # (d_model, num_steps) at one budget
    dense_loss = {16: [1.5], 32: [1.4, 1.42], 64: [1.45, 1.33]}  # mean over seeds: d64 (1.39) is best
    peer_loss = {16: 1.30, 32: 1.35, 64: 1.32}
    moe_loss = {16: 1.36, 32: 1.31, 64: 1.34}  # best in the middle: not an edge
    variants = []
    for d, steps in shapes:
        variants.append(_variant(f"moe_dropless_1e12_L1_d{d}", "moe_dropless", None, d, steps, 0.04))
        variants.append(_variant(f"dense_1e12_L1_d{d}", "dense", None, d, steps, {16: 0.01, 32: 0.03, 64: 0.1}[d]))
        for mode, step_s in (("efficient", 0.05), ("native", 0.02)):
            variants.append(_variant(f"peer_1e12_L1_d{d}", "peer", mode, d, steps, step_s))
    variants.append(_variant("pkm_1e12_L1_d16", "pkm", "native", 16, 1000, 0.02))  # timed, never trained
    timing = {"grid": "fake", "budget": 1e12, "git": "abc", "rounds": 2, "steps": 2, "xla_cpu_pin": "AVX2",
              "xla_cpu_threads": 2, "loadavg_before": [0.5, 0, 0], "loadavg_after": [0.7, 0, 0],
              "host": {"cpu_model": "Test CPU", "usable_cpus": 2, "xla_cpu_isa": "AVX2"}, "variants": variants}
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    for seed in (0, 1):
        root = tmp_path / f"seed{seed}"
        for d, _ in shapes:
            if seed < len(dense_loss[d]):
                _summary(root, f"dense_1e12_L1_d{d}", "dense", dense_loss[d][seed], params=100.0 * d * d)
            if seed == 0:
                _summary(root, f"peer_1e12_L1_d{d}", "peer", peer_loss[d], params=100.0 * d * d)
                _summary(root, f"moe_dropless_1e12_L1_d{d}", "moe_dropless", moe_loss[d], params=100.0 * d * d)
        _summary(root, "dense_3e12_L1_d16", "dense", 1.0, budget=3e12)  # another budget: ignored
    out = tmp_path / "out"
    assert wallclock.main(["--timing", str(tmp_path / "timing.json"), "--root", str(tmp_path / "seed0"),
                           "--root", str(tmp_path / "seed1"), "--out", str(out)]) == 0

    res = json.loads((out / "wallclock_1e12.json").read_text())
    best = {(b["method"], b["compute"]): b for b in res["best"]}
    assert set(best) == {("dense", None), ("moe_dropless", None), ("peer", "efficient"), ("peer", "native")}
    assert best[("dense", None)]["point"] == "dense_1e12_L1_d64" and best[("dense", None)]["seeds"] == 2
    assert best[("dense", None)]["loss"] == pytest.approx(1.39)
    assert best[("dense", None)]["wall_s"] == pytest.approx(25.0)  # 250 steps × 0.1 s
    for mode, wall in (("efficient", 50.0), ("native", 20.0)):  # PEER's best: d16, 1000 steps
        b = best[("peer", mode)]
        assert b["point"] == "peer_1e12_L1_d16" and b["wall_s"] == pytest.approx(wall)
        assert b["rel_wall"] == pytest.approx(wall / 25.0)
    assert res["missing"] == ["pkm_1e12_L1_d16/native"] and len(res["rows"]) == 12
    table = (out / "wallclock_1e12.md").read_text()
    # dense's and PEER's picks are an end of their shapes (MoE's is not); dense's have 1 or 2 seeds
    assert best[("dense", None)]["edge"] and best[("peer", "native")]["edge"]
    assert best[("moe_dropless", None)]["point"] == "moe_dropless_1e12_L1_d32" and not best[("moe_dropless", None)]["edge"]
    assert "| L1 d32 | 1.3100 |" in (out / "wallclock_1e12.md").read_text()
    assert best[("dense", None)]["seeds_uneven"] and not best[("peer", "native")]["seeds_uneven"]
    assert "| PEER | native | L1 d16 † | 1.3000 | 1 | 1000 | 20.0 ms | 20 s | 0.80 | 3 |" in table
    assert "| Dense | — | L1 d64 † | 1.3900 | 2 | 250 | 100.0 ms | 25 s | 1.00 | 3 |" in table
    assert "(Dense, PEER): its optimum may lie beyond them" in table
    assert "Seeds differ across the shapes of Dense:" in table
    for text in (table, res["caption"]):
        assert "not TPU wall time" in text and "2 thread(s)" in text and "ranking can differ" in text
    assert (out / "wallclock_1e12.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["name"]: r for r in res["rows"]}
    assert math.isclose(rows["dense_1e12_L1_d16"]["wall_s"], 1000 * 0.01)


def test_wallclock_without_matching_runs_fails_with_one_line(tmp_path, capsys):
    timing = {"grid": "fake", "budget": 1e12, "variants": [_variant("dense_1e12_L1_d16", "dense", None, 16, 10, 0.1)]}
    (tmp_path / "t.json").write_text(json.dumps(timing))
    _summary(tmp_path / "r", "dense_3e12_L1_d16", "dense", 1.0, budget=3e12)
    assert wallclock.main(["--timing", str(tmp_path / "t.json"), "--root", str(tmp_path / "r"),
                           "--out", str(tmp_path / "o")]) == 2
    assert "no timed variant" in capsys.readouterr().err
