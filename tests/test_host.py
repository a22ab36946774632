"""peer_jax.host: the host record and the XLA:CPU pin's checks (fast, in-process); compare_runs,
which reads the host records."""

import json
from pathlib import Path

import jax
import pytest

from peer_jax import compare_runs, host

AVX2_CPU = {"sse4_2", "avx", "avx2", "fma"}


def test_best_isa_needs_every_level_below():
    assert host.best_isa(AVX2_CPU) == "AVX2"
    assert host.best_isa(AVX2_CPU - {"fma"}) == "AVX"  # XLA's AVX2 level emits FMA
    assert host.best_isa(AVX2_CPU | {"avx512_vnni"}) == "AVX2"  # VNNI without AVX-512 foundation
    avx512 = AVX2_CPU | set(host.ISA_LEVELS["AVX512"])
    assert host.best_isa(avx512 | {"avx512_vnni"}) == "AVX512_VNNI"


def test_unknown_level_names_the_setting_and_the_choices():
    with pytest.raises(host.PinError, match=r"TrainConfig.xla_cpu_pin='AVX3' is not an XLA:CPU ISA level; use one of "
                                            r"\['SSE4_2', 'AVX', 'AVX2'"):
        host.pin_xla_cpu("AVX3")


def test_a_cpu_without_the_level_is_refused(monkeypatch):
    monkeypatch.setattr(host, "cpu_flags", lambda: set(AVX2_CPU))
    monkeypatch.setattr(host.platform, "machine", lambda: "x86_64")
    missing = "avx512bw, avx512cd, avx512dq, avx512f, avx512vl"
    with pytest.raises(host.PinError, match=rf"lacks {missing} and would .*\(at most AVX2\)"):
        host.pin_xla_cpu("AVX512")


def test_conflicting_xla_flags_are_refused(monkeypatch):
    monkeypatch.setattr(host, "best_isa", lambda flags=None: "AVX2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX")
    with pytest.raises(host.PinError, match="conflicts with XLA_FLAGS=.*remove --xla_cpu_max_isa from XLA_FLAGS"):
        host.pin_xla_cpu("AVX2")


def test_a_started_backend_without_the_pin_is_one_clear_error(monkeypatch):
    jax.devices()  # the test session's backend runs with conftest's XLA_FLAGS
    monkeypatch.setattr(host, "best_isa", lambda flags=None: "AVX2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.raises(host.PinError, match="must be applied before JAX's backend starts"):
        host.pin_xla_cpu("AVX2")
    # already in effect (e.g. a second run in one process): nothing to do
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type=")
    host.pin_xla_cpu("AVX2")
    host.pin_xla_cpu(None)


def test_describe_and_differences():
    d = host.describe("AVX2")
    assert d["jax"] == jax.__version__ and d["platform"] == "cpu" and d["xla_cpu_pin"] == "AVX2"
    assert set(host.HOST_CLASS_KEYS) <= set(d)
    other = {**d, "hostname": "elsewhere"}
    assert host.differences(d, other) == []  # same class of machine
    other = {**other, "cpu_model": "AMD EPYC 7B13", "cpu_isa": "AVX2"}
    assert host.differences(d, other) == [f"cpu_model: {d['cpu_model']!r} vs 'AMD EPYC 7B13'",
                                          f"cpu_isa: {d['cpu_isa']!r} vs 'AVX2'"]
    assert host.differences(d, None) == ["no host entry: the run predates host recording"]


def test_compare_runs_names_runs_from_different_hosts():
    h = host.describe(None)
    rows = [{"run": "seed0", "host": h}, {"run": "rerun", "host": dict(h)},
            {"run": "elsewhere", "host": {**h, "usable_cpus": 64}}]
    (note,) = compare_runs.host_notes(rows)
    assert note.startswith(f"elsewhere vs seed0: different or unknown hosts (usable_cpus: {h['usable_cpus']} vs 64)")


def test_thread_pin_checks_the_cpus_and_the_backend():
    usable = len(host.os.sched_getaffinity(0))
    with pytest.raises(host.PinError, match=rf"xla_cpu_threads={usable + 1}: this process may use {usable} CPU"):
        host.pin_threads(usable + 1)
    host.pin_threads(usable)  # already so: nothing to do
    host.pin_threads(None)
    if usable > 1:
        jax.devices()
        with pytest.raises(host.PinError, match="must be applied before JAX's backend starts"):
            host.pin_threads(1)


def test_compare_runs_refuses_a_path_that_is_not_a_finished_run(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        compare_runs.main([str(tmp_path / "sweep.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a finished run folder" in err and "sweep.json (no operative_config.gin, metrics.jsonl, result.json)" in err


def test_compare_runs_prints_perplexity_or_the_loss_the_fit_reads(capsys):
    run = Path(__file__).resolve().parents[1] / "results" / "isoflop_mini3" / "seed0" / "dense_1e13_L2_d48_h2"
    result = json.loads((run / "result.json").read_text())
    tables = {}
    for metric in ("ppl", "loss"):
        compare_runs.main([str(run), f"--metric={metric}"])
        head, _, row = capsys.readouterr().out.splitlines()[:3]
        tables[metric] = dict(zip(head.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert tables["ppl"]["eval/kjv/ppl"] == f"{result['eval/kjv/ppl']:.3f}" and "eval/kjv/loss" not in tables["ppl"]
    assert tables["loss"]["eval/kjv/loss"] == f"{result['eval/kjv/loss']:.4f}" == "1.1856"
    assert "eval/kjv/ppl" not in tables["loss"]
    compare_runs.main([str(run), str(run.parents[1] / "seed2" / "dense_1e13_L2_d64_h2"),
                       str(run.parent / "dense_1e13_L2_d64_h2")])  # one point of two seeds: the sweep is named
    names = [line.split(" | ")[0].strip("| ") for line in capsys.readouterr().out.splitlines()[2:5]]
    assert names == ["dense_1e13_L2_d48_h2", "seed2/dense_1e13_L2_d64_h2", "seed0/dense_1e13_L2_d64_h2"]
