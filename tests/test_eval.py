"""Perplexity by hand, padding/partial-batch invariance, file-based eval sets, checkpoint eval."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peer_jax import sharding
from peer_jax.data import pipeline, vocab as vocab_lib
from peer_jax.eval import format_table, run_eval
from peer_jax.models.transformer import Transformer
from peer_jax.training import evaluate as eval_lib, loop, optim, step as step_lib
from peer_jax.training.config import TrainConfig

V, T = 64, 16
FACTORY = functools.partial(Transformer, num_layers=1, d_model=16, num_heads=2)


@pytest.fixture(scope="module")
def tiny():
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = sharding.RULES_DEFAULT
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup, state, shard = step_lib.create_train_state(FACTORY, optax.sgd(0.1), V, T, 0, mesh, rules)
        eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(setup), shard, setup)
    rng = np.random.default_rng(0)
    n = 7
    arrays = {"inputs": rng.integers(0, V, (n, T)).astype(np.int32),
              "targets": rng.integers(0, V, (n, T)).astype(np.int32),
              "segment_ids": np.ones((n, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (n, 1))}
    arrays["segment_ids"][2, 10:] = 0  # a padded tail
    arrays["weights"] = (arrays["segment_ids"] > 0).astype(np.float32)
    return mesh, rules, setup, state, eval_step, arrays


def _evaluate(tiny, batch_size):
    mesh, rules, setup, state, eval_step, arrays = tiny
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return eval_lib.evaluate(eval_step, setup, state["params"], state["model_state"],
                                 pipeline.eval_batches(arrays, batch_size), pipeline.empty_batch(batch_size, T),
                                 batch_size)


def test_perplexity_is_exp_of_mean_token_loss_by_hand(tiny):
    mesh, rules, setup, state, _, arrays = tiny
    model = nnx.merge(setup.graphdef, state["params"], state["model_state"])
    total, count = 0.0, 0
    for i in range(len(arrays["inputs"])):
        logits = np.asarray(model(jnp.asarray(arrays["inputs"][i:i + 1]), segment_ids=jnp.asarray(arrays["segment_ids"][i:i + 1])))[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        for t in range(T):
            if arrays["weights"][i, t]:
                total -= logp[t, arrays["targets"][i, t]]
                count += 1
    res = _evaluate(tiny, 7)
    assert res["tokens"] == count == 7 * T - 6
    np.testing.assert_allclose(res["loss"], total / count, rtol=1e-5)
    np.testing.assert_allclose(res["ppl"], math.exp(total / count), rtol=1e-5)


def test_partial_batches_and_padding_rows_do_not_change_the_result(tiny):
    ref = _evaluate(tiny, 7)
    for bs in (1, 3, 4, 16):  # 7 rows: partial last batches, and one batch mostly padding
        res = _evaluate(tiny, bs)
        assert res["tokens"] == ref["tokens"]
        np.testing.assert_allclose(res["loss"], ref["loss"], rtol=1e-6)


@pytest.fixture
def eval_dir(tmp_path):
    (tmp_path / "lambada").mkdir()
    docs = [{"text": f"passage {i}: the \"quick\" brown fox\njumps over the lazy dog {i}"} for i in range(5)]
    (tmp_path / "lambada" / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return tmp_path, docs


def test_file_based_eval_set_reads_local_jsonl(eval_dir):
    directory, docs = eval_dir
    byte = vocab_lib.vocabulary("byte")
    arrays = pipeline.packed_arrays("lambada", "validation", 32, byte, eval_data_dir=str(directory), use_cache=False)
    assert int(arrays["weights"].sum()) == sum(len(d["text"].encode()) + 1 for d in docs)


def test_missing_eval_file_is_a_clear_error(eval_dir):
    byte = vocab_lib.vocabulary("byte")
    with pytest.raises(FileNotFoundError, match=r"wikitext103/validation.jsonl does not exist.*prepare_eval_data"):
        pipeline.packed_arrays("wikitext103", "validation", 32, byte, eval_data_dir=str(eval_dir[0]), use_cache=False)


def test_eval_data_dir_defaults_to_the_environment_variable(eval_dir, monkeypatch):
    directory, docs = eval_dir
    byte = vocab_lib.vocabulary("byte")
    monkeypatch.setenv("PEER_JAX_EVAL_DATA", str(directory))
    arrays = pipeline.packed_arrays("lambada", "validation", 32, byte, use_cache=False)
    assert int(arrays["weights"].sum()) == sum(len(d["text"].encode()) + 1 for d in docs)
    monkeypatch.setenv("PEER_JAX_EVAL_DATA", str(directory / "elsewhere"))
    assert pipeline.packed_arrays("lambada", "validation", 32, byte, eval_data_dir=str(directory),
                                  use_cache=False)["weights"].sum() == arrays["weights"].sum()  # the setting wins
    with pytest.raises(FileNotFoundError, match="elsewhere/lambada/validation.jsonl does not exist"):
        pipeline.packed_arrays("lambada", "validation", 32, byte, use_cache=False)


def test_a_runs_final_eval_is_peer_jax_eval_on_its_checkpoint(tmp_path, eval_dir):
    """Intermediate evals read the fixed subset (`eval_subset/...`); the final eval reads every token
    of every task's split (`eval/...`) and equals `peer_jax.eval` on the run's final checkpoint.

    Tolerance: none. Both run the same compiled eval step on the same restored parameters over
    the same batches in the same order, summing in the same order, so the figures are the same
    floats; a difference would mean the two read different tokens or different weights."""
    cfg = TrainConfig(model=FACTORY, optimizer=functools.partial(optim.make_optimizer, warmup_steps=1),
                      eval_tasks=("kjv", "lambada"), seq_len=64, batch_size=8, num_steps=4, log_every=1,
                      eval_every=2, eval_batches=2, eval_batch_size=64, checkpoint_every=4, progress_bar=False,
                      tensorboard=False, vocab_multiple=64, eval_data_dir=str(eval_dir[0]))
    trained = loop.train(cfg, str(tmp_path))
    byte = vocab_lib.vocabulary("byte")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mid, final = [r for r in rows if r["step"] == 2 and "eval_subset/kjv/loss" in r], rows[-1]
    assert len(mid) == 1 and not any(k.startswith("eval/") or k == "eval_loss" for k in mid[0])
    assert final["step"] == 4 and final["eval_loss"] == trained["eval/kjv/loss"]

    res = run_eval(cfg, str(tmp_path / "checkpoints"), ["kjv", "lambada"])
    subset = run_eval(cfg, str(tmp_path / "checkpoints"), ["kjv"], max_batches=2)["tasks"]["kjv"]
    assert res["step"] == 4
    for task in ("kjv", "lambada"):
        arrays = pipeline.packed_arrays(task, "validation", 64, byte, eval_data_dir=cfg.eval_data_dir)
        size = float(arrays["weights"].sum())
        assert trained[f"eval/{task}/tokens"] == trained[f"eval/{task}/split_tokens"] == size
        for key in ("loss", "ppl", "tokens", "split_tokens"):
            assert res["tasks"][task][key] == trained[f"eval/{task}/{key}"], (task, key)
    # The subset is the first eval_batches × eval_batch_size rows, also reported at the final step.
    assert trained["eval_subset/kjv/tokens"] == subset["tokens"] < subset["split_tokens"]
    assert trained["eval_subset/kjv/loss"] == subset["loss"]
    assert mid[0]["eval_subset/kjv/tokens"] == subset["tokens"]
    assert "lambada" in format_table(res)


def test_train_and_eval_command_lines_round_trip(tmp_path, capsys):
    """`python -m peer_jax.train` then `python -m peer_jax.eval` on the same gin: JSON next to the checkpoint."""
    from peer_jax import eval as eval_cli, train as train_cli

    gin = ["--gin_file=configs/runs/tiny_cpu.gin", "--gin.transformer.Transformer.num_layers=1",
           "--gin.transformer.Transformer.d_model=32", "--gin.transformer.Transformer.num_heads=1",
           "--gin.config.TrainConfig.num_steps=2", "--gin.config.TrainConfig.batch_size=8",
           "--gin.config.TrainConfig.seq_len=32", "--gin.config.TrainConfig.eval_every=2",
           "--gin.config.TrainConfig.eval_batches=2", "--gin.config.TrainConfig.final_eval_batches=2",
           "--gin.config.TrainConfig.checkpoint_every=2",
           "--gin.config.TrainConfig.progress_bar=False", "--gin.config.TrainConfig.tensorboard=False"]
    assert train_cli.main([*gin, f"--workdir={tmp_path}"]) == 0
    trained = json.loads((tmp_path / "result.json").read_text())
    ckpts = f"--checkpoint_dir={tmp_path / 'checkpoints'}"
    assert eval_cli.main([*gin, ckpts, "--tasks=kjv", "--max_batches=2"]) == 0
    out = json.loads((tmp_path / "checkpoints" / "eval_step2.json").read_text())
    assert out["step"] == 2
    np.testing.assert_allclose(out["tasks"]["kjv"]["loss"], trained["eval/kjv/loss"], rtol=1e-6)
    assert "kjv" in capsys.readouterr().out
    assert eval_cli.main([*gin, ckpts, "--tasks=no_such_task"]) == 2
    assert "no_such_task" in capsys.readouterr().err
