"""`peer_jax.sample`: KV-cache decode equals the no-cache reference and the eval loss, for every
FFW type and scanned layers; the command line and its bad-input errors."""

import functools
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from peer_jax import sample, sharding
from peer_jax import train as train_cli
from peer_jax.layers.moe import MoE
from peer_jax.layers.peer import PEER
from peer_jax.layers.pkm import PKM
from peer_jax.models.transformer import Transformer
from peer_jax.training import step as step_lib

V, VOCAB, EOS, NEW = 64, 60, 1, 6
ROWS = [[5, 6, 7], [9], [10, 11, 12, 13, 14], [20, 21]]  # four lengths: left padding of 0 to 4
TINY = dict(num_layers=3, d_model=16, num_heads=2)
MODELS = {
    "dense": dict(),
    "moe_expert_choice": dict(sparse_ffw=functools.partial(MoE, num_experts=4, mlp_dim=16)),
    "moe_dropless": dict(sparse_ffw=functools.partial(MoE, num_experts=4, mlp_dim=16, routing="dropless", top_k=1)),
    "pkm": dict(sparse_ffw=functools.partial(PKM, num_experts=64, heads=2, top_k=4, d_key=8)),
    "peer": dict(sparse_ffw=functools.partial(PEER, num_experts=64, heads=2, top_k=4, d_key=8)),
    # scan(block 0), the PEER block 1, scan(block 2)
    "scanned_peer": dict(scan_layers=True, sparse_ffw=functools.partial(PEER, num_experts=64, heads=2, top_k=4,
                                                                         d_key=8)),
}


@pytest.fixture(scope="module")
def mesh_rules():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), sharding.RULES_DEFAULT


class _Decoded(dict):
    """Per model, built on first use (an xdist worker builds only the models its tests read):
    (setup, state, cached (tokens, logprobs), no-cache (tokens, logprobs))."""

    def __init__(self, mesh, rules):
        super().__init__()
        self.mesh, self.rules = mesh, rules

    def __missing__(self, name):
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            factory = functools.partial(Transformer, **TINY, **MODELS[name])
            setup, state, _ = step_lib.create_train_state(factory, optax.sgd(0.1), V, 16, 0, self.mesh, self.rules)
            # Query-BN running statistics away from their initial (0, 1), so eval mode matters.
            state["model_state"] = jax.tree.map(lambda x: x * 0.5 + 0.3, state["model_state"])
            run = functools.partial(sample.generate, setup, state["params"], state["model_state"], ROWS, NEW,
                                    vocab_size=VOCAB, eos_id=EOS)
            self[name] = setup, state, run(), run(use_cache=False)
        return self[name]


@pytest.fixture(scope="module")
def decoded(mesh_rules):
    return _Decoded(*mesh_rules)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_decode_with_cache_equals_no_cache_reference(decoded, name):
    _, _, (tok, lp), (ref_tok, ref_lp) = decoded[name]
    assert tok == ref_tok
    assert all(1 <= len(t) <= NEW for t in tok)
    for a, b in zip(lp, ref_lp):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_a_second_call_does_not_recompile(decoded, mesh_rules, use_cache):
    """`generate` reuses its jitted prefill and step (or reference step) for the same model,
    shapes and sampling setting: a second call, with another seed, neither traces nor compiles,
    and gives the first call's greedy tokens. Another setting does compile."""
    mesh, rules = mesh_rules
    setup, state, cached, ref = decoded["peer"]
    events = []

    def listen(event, secs, **_):
        if event.startswith("/jax/core/compile/"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            run = functools.partial(sample.generate, setup, state["params"], state["model_state"], ROWS, NEW,
                                    vocab_size=VOCAB, eos_id=EOS, use_cache=use_cache)
            again = run(seed=7)
            assert events == [] and again == (cached if use_cache else ref)
            run(temperature=0.5)  # another sampling setting: traced and compiled once
            assert any(e.endswith("backend_compile_duration") for e in events), events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def eval_batch(rows, generated):
    """The decode's layout of each row's prompt + completion as an eval batch (left-padded the
    same way, so MoE routing groups hold the same tokens), weights on the completion only."""
    width = 1 + max(len(r) for r in rows)
    length = width + NEW - 1
    b = {k: np.zeros((len(rows), length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    b["weights"] = np.zeros((len(rows), length), np.float32)
    for i, (r, g) in enumerate(zip(rows, generated)):
        full = [0, *r, *g]
        pad = width - 1 - len(r)
        n = len(full) - 1
        b["inputs"][i, pad:pad + n], b["targets"][i, pad:pad + n] = full[:-1], full[1:]
        b["segment_ids"][i, pad:pad + n], b["positions"][i, pad:pad + n] = 1, np.arange(n)
        b["weights"][i, pad + len(r):pad + n] = 1
    return b


@pytest.mark.parametrize("name", list(MODELS))
def test_completion_logprobs_equal_the_eval_loss(decoded, mesh_rules, name):
    mesh, rules = mesh_rules
    setup, state, (tok, lp), _ = decoded[name]
    batch = eval_batch(ROWS, tok)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step = jax.jit(step_lib.make_eval_step(setup))
        for i in range(len(ROWS)):  # one row's weights at a time: its own loss, the others still in the batch
            w = np.zeros_like(batch["weights"])
            w[i] = batch["weights"][i]
            out = step(state["params"], state["model_state"], step_lib.host_batch({**batch, "weights": w}, setup))
            assert float(out["tokens"]) == len(tok[i])
            np.testing.assert_allclose(float(out["loss_sum"]), -sum(lp[i]), rtol=1e-5)


def test_sampling_filters():
    logits = jax.numpy.log(jax.numpy.array([[0.05, 0.5, 0.3, 0.1, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda **kw: {int(sample.choose(logits, k, vocab_size=5, **kw)[0][0]) for k in keys}  # noqa: E731
    assert draw(temperature=0.0, top_k=0, top_p=1.0) == {1}
    assert draw(temperature=1.0, top_k=2, top_p=1.0) == {1, 2}  # id 0 (padding) is never drawn
    assert draw(temperature=1.0, top_k=0, top_p=0.85) == {1, 2, 3}  # 0.5 + 0.3 < 0.85 <= 0.9
    assert draw(temperature=1.0, top_k=0, top_p=1.0) == {1, 2, 3, 4}
    tok, lp = sample.choose(logits, keys[0], temperature=0.7, top_k=2, top_p=1.0, vocab_size=4)
    np.testing.assert_allclose(float(lp[0]), float(logits[0, int(tok[0])]), rtol=1e-6)  # the model's, unfiltered


def test_moe_settings_decode_cannot_reproduce_are_refused():
    def model(**kw):
        return nnx.eval_shape(lambda: Transformer(V, rngs=nnx.Rngs(0), **TINY,
                                                  sparse_ffw=functools.partial(MoE, num_experts=4, **kw)))

    with pytest.raises(sample.SampleError, match="grouping='sequence'"):
        sample.check_routing(model(grouping="sequence"), 4)
    with pytest.raises(sample.SampleError, match="token_choice"):
        sample.check_routing(model(routing="token_choice"), 4)
    with pytest.raises(sample.SampleError, match="group_size=4 must divide the decode batch \\(6 rows"):
        sample.check_routing(model(group_size=4), 6)
    sample.check_routing(model(group_size=2), 6)


# ------------------------------------------------------------------------------------ command line

GIN = ["--gin_file=configs/runs/tiny_cpu.gin", "--gin.transformer.Transformer.num_layers=1",
       "--gin.transformer.Transformer.d_model=32", "--gin.transformer.Transformer.num_heads=1",
       "--gin.config.TrainConfig.num_steps=1", "--gin.config.TrainConfig.batch_size=8",
       "--gin.config.TrainConfig.seq_len=32", "--gin.config.TrainConfig.eval_every=1",
       "--gin.config.TrainConfig.eval_batches=1", "--gin.config.TrainConfig.final_eval_batches=1",
       "--gin.config.TrainConfig.checkpoint_every=1",
       "--gin.config.TrainConfig.progress_bar=False", "--gin.config.TrainConfig.tensorboard=False"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    work = tmp_path_factory.mktemp("sample_run")
    assert train_cli.main([*GIN, f"--workdir={work}"]) == 0
    return work / "checkpoints"


def test_command_line_prints_samples_and_writes_json(checkpoints, tmp_path, capsys):
    runs = {}
    for flag in ([], ["--no_cache"]):
        out = tmp_path / f"samples{len(flag)}.json"
        assert sample.main([*GIN, f"--checkpoint_dir={checkpoints}", "--prompt=And God said", "--prompt=In",
                                "--max_new_tokens=5", f"--json={out}", *flag]) == 0
        printed = capsys.readouterr().out
        assert "And God said" in printed and "--- prompt 2, sample 1" in printed
        runs[len(flag)] = json.loads(out.read_text())["samples"]
    for s, ref in zip(runs[0], runs[1]):
        assert set(s) == {"prompt", "completion", "tokens", "logprobs"}
        assert s["tokens"] == ref["tokens"] and 1 <= len(s["tokens"]) <= 5
        np.testing.assert_allclose(s["logprobs"], ref["logprobs"], rtol=1e-5, atol=1e-5)
        assert all(x <= 0 for x in s["logprobs"])
        assert bytes(t - 3 for t in s["tokens"] if t >= 3).decode("utf-8", "ignore") == s["completion"]
    assert [s["prompt"] for s in runs[0]] == ["And God said", "In"]


@pytest.mark.parametrize("args,message", [
    (["--temperature=-1"], "--temperature=-1.0 must be >= 0"),
    (["--top_p=0"], "--top_p=0.0 must be in (0, 1]"),
    (["--top_p=1.5"], "--top_p=1.5 must be in (0, 1]"),
    (["--top_k=-2"], "--top_k=-2 must be >= 0"),
    (["--prompt=" + "x" * 33], "prompt 1 is 33 tokens, longer than the model's maximum length 32"),
    (["--prompt=" + "x" * 20, "--max_new_tokens=20"],
     "prompt 1 is 20 tokens; with --max_new_tokens=20 that is 40, over the model's maximum length 32"),
    (["--prompt=ok", "--prompt=bad \udcff byte", "--max_new_tokens=5"], "prompt 2 (b'bad \\xff byte') holds bytes the ByteVocabulary cannot"),
])
def test_bad_input_is_one_clear_line(checkpoints, capsys, args, message):
    prompt = [] if any(a.startswith("--prompt=") for a in args) else ["--prompt=In"]
    assert sample.main([*GIN, f"--checkpoint_dir={checkpoints}", *prompt, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_missing_or_empty_checkpoint_dir_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for d, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no checkpoint")):
        assert sample.main([*GIN, f"--checkpoint_dir={d}", "--prompt=In"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--checkpoint_dir={d}" in err[0] and message in err[0], err
    assert not (tmp_path / "missing").exists()
