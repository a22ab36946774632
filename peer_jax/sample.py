"""`python -m peer_jax.sample --gin_file=F --checkpoint_dir=DIR/checkpoints --prompt=TEXT [--prompt=...] [--distributed]`.

Restores a checkpoint (latest or `--step`) into the run's shardings, like `peer_jax.eval`, and
continues each prompt by `--max_new_tokens` tokens (stopping a row at EOS). Prompts are
batched (`--num_samples` rows each) and left-padded: every row's next token sits in the same
column, and padding is masked out of attention and of the sparse layers.

Decoding is a prefill of the prompts plus one jitted one-token step over a preallocated KV
cache (`Transformer.decode`), each compiled once per shape. `--no_cache` instead recomputes
the model's plain forward pass over the whole buffer for every new token: the reference.
Every layer runs in eval mode (query BatchNorm on its running statistics). The model reads
what training fed it: a row starts with the BOS id 0 (seqio's shifted-right inputs), so the
first generated token is predicted from the whole prompt.

Expert-choice MoE (`grouping='position'`): a routing group is the tokens in one column of the
decode batch (with `group_size`, of each block of that many rows), the rule training applies to
its batch, applied to the rows being decoded; decode computes exactly what the forward pass (and
`peer_jax.eval`'s loss) computes on the same rows. The capacity follows the group's size, so
with fewer rows than the training group each token reaches more experts than in training (one
row: every expert). Filler rows that make the batch split over the data-parallel devices are
padding (never routed) but count in that size. Settings whose routing depends on tokens not yet
generated (`grouping='sequence'`, token choice) are refused.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAD_ID = 0  # seqio: padding, and the BOS that starts every shifted-right input row
EOS_ID = 1  # seqio's EOS, in its byte and SentencePiece vocabularies alike


class SampleError(ValueError):
    """Bad sampling input, reported as one line."""


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int, num_samples: int) -> None:
    if temperature < 0:
        raise SampleError(f"--temperature={temperature} must be >= 0 (0 = greedy).")
    if not 0 < top_p <= 1:
        raise SampleError(f"--top_p={top_p} must be in (0, 1] (1 = off).")
    if top_k < 0:
        raise SampleError(f"--top_k={top_k} must be >= 0 (0 = off).")
    if max_new_tokens < 1:
        raise SampleError(f"--max_new_tokens={max_new_tokens} must be >= 1.")
    if num_samples < 1:
        raise SampleError(f"--num_samples={num_samples} must be >= 1.")


def encode_prompts(vocab, prompts: list[str], max_len: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt; fails on text the vocabulary cannot encode exactly and on a
    prompt that, with `max_new_tokens`, does not fit the model's maximum length."""
    from peer_jax.data import vocab as vocab_lib

    vocab = vocab_lib.as_seqio(vocab)
    if not prompts:
        raise SampleError("no prompt: pass --prompt=TEXT (repeatable) or --prompt_file=FILE.")
    out = []
    for i, text in enumerate(prompts, 1):
        try:  # text from undecodable bytes (argv's surrogate escapes) does not encode as UTF-8
            ids = [int(t) for t in vocab.encode(text)]
        except UnicodeError:
            ids = None
        if ids is None or getattr(vocab, "unk_id", None) in ids:
            bad = text.encode("utf-8", "surrogateescape")
            raise SampleError(f"prompt {i} ({bad[:40]!r}) holds bytes the {type(vocab).__name__} cannot encode "
                              "(text must be valid UTF-8 the vocabulary covers); fix the prompt.")
        if len(ids) > max_len:
            raise SampleError(f"prompt {i} is {len(ids)} tokens, longer than the model's maximum length "
                              f"{max_len} (TrainConfig.seq_len); shorten it.")
        if len(ids) + max_new_tokens > max_len:
            raise SampleError(f"prompt {i} is {len(ids)} tokens; with --max_new_tokens={max_new_tokens} that is "
                              f"{len(ids) + max_new_tokens}, over the model's maximum length {max_len} "
                              "(TrainConfig.seq_len); shorten the prompt or lower --max_new_tokens.")
        out.append(ids)
    return out


def check_routing(model, rows: int) -> None:
    """Refuses sparse layers whose decode cannot reproduce their forward pass."""
    from peer_jax.layers.moe import MoE

    for ffw, _ in model.ffw_layers():
        if not isinstance(ffw, MoE) or ffw.routing == "dropless":
            continue
        if ffw.routing == "token_choice":
            raise SampleError("MoE routing='token_choice' cannot be decoded token by token: a token's slot depends "
                              "on the capacity of its whole routing group (set by the training length); sample "
                              "from an expert_choice (grouping='position') or dropless model.")
        if ffw.grouping != "position":
            raise SampleError(f"MoE grouping={ffw.grouping!r} routes each token against later tokens of its "
                              "sequence, which do not exist while decoding; decode supports expert choice with "
                              "grouping='position' (the default).")
        if ffw.group_size is not None and rows % ffw.group_size:
            raise SampleError(f"MoE group_size={ffw.group_size} must divide the decode batch ({rows} rows = "
                              "prompts x --num_samples); change --num_samples or the number of prompts.")


def left_pad(rows: list[list[int]]):
    """(tokens, positions, segment_ids) int32 [B, 1 + longest prompt]: BOS + prompt, right-aligned."""
    import numpy as np

    width = 1 + max(len(r) for r in rows)
    tokens = np.full((len(rows), width), PAD_ID, np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for i, r in enumerate(rows):
        n = 1 + len(r)
        tokens[i, width - n + 1:] = r
        positions[i, width - n:] = np.arange(n)
        segments[i, width - n:] = 1
    return tokens, positions, segments


def choose(logits, key, *, temperature: float, top_k: int, top_p: float, vocab_size: int):
    """(token [B], its log-probability under the model [B]) from next-token logits [B, V].

    Only ids of the vocabulary (not padding, not the rows added by `vocab_multiple`) are drawn;
    the log-probability is the model's own (full softmax at temperature 1), as in the loss.
    """
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits, axis=-1)
    ids = jnp.arange(logits.shape[-1])
    z = jnp.where((ids < vocab_size) & (ids != PAD_ID), logits, -jnp.inf)
    if temperature == 0:
        tok = jnp.argmax(z, axis=-1)
    else:
        z = z / temperature
        if top_k:
            kth = jax.lax.top_k(z, min(top_k, z.shape[-1]))[0][:, -1:]
            z = jnp.where(z < kth, -jnp.inf, z)
        if top_p < 1:
            srt = jnp.sort(z, axis=-1)[:, ::-1]
            p = jax.nn.softmax(srt, axis=-1)
            keep = jnp.cumsum(p, axis=-1) - p < top_p  # the smallest prefix reaching top_p (never empty)
            cut = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
            z = jnp.where(z < cut, -jnp.inf, z)
        tok = jax.random.categorical(key, z, axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, mesh, rules, b: int, width: int, length: int, use_cache: bool, eos_id: int,
              sampling: tuple):
    """The jitted ``(first, advance)`` of ``generate`` for one model, layout and sampling setting,
    built once: repeated calls with the same shapes reuse jit's traces and executables instead of
    tracing fresh closures. ``first`` is the prefill (with the cache) or None (the reference's
    first call is ``advance``). ``sampling``: (temperature, top_k, top_p, vocab_size); the random
    key is an argument (its raw data, a host array like the tokens), so a new seed does not
    recompile. ``rules`` keys the cache because the traces read the logical rules in context."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    del rules
    temperature, top_k, top_p, vocab_size = sampling
    pick = lambda logits, seed, i: choose(logits, jax.random.fold_in(jax.random.wrap_key_data(seed), i),  # noqa: E731
                                         temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
    model = lambda p, s: nnx.merge(graphdef, p, s)  # noqa: E731
    replicated = NamedSharding(mesh, P())

    # A row that has produced EOS goes on being computed (shapes stay fixed) but feeds its
    # later tokens as padding (segment 0): invisible to the other rows' attention and routing,
    # so every row's log-probabilities are those of its text alone in this batch layout.
    if use_cache:
        def prefill(params, model_state, seed, t, p, s):
            m = model(params, model_state)
            logits, cache = m.decode(t, p, s, m.init_cache(b, length))
            tok, lp = pick(logits[:, -1], seed, 0)
            return tok, lp, (cache, p[:, -1] + 1, (tok == eos_id) | (s[:, -1] == 0))

        def step(params, model_state, seed, state, tok, i):
            cache, pos, done = state
            seg = (~done).astype(jnp.int32)[:, None]
            logits, cache = model(params, model_state).decode(tok[:, None], pos[:, None], seg, cache)
            nxt, lp = pick(logits[:, 0], seed, i)
            return nxt, lp, (cache, pos + 1, done | (nxt == eos_id))

        return (jax.jit(prefill, out_shardings=(replicated, replicated, None)),
                jax.jit(step, donate_argnums=(3,), out_shardings=(replicated, replicated, None)))

    def full(params, model_state, seed, state, tok, i):
        del tok  # already written into the buffer
        t, p, s, done = state
        col = width - 1 + i
        logits = model(params, model_state)(t, positions=p, segment_ids=s, mask=s > 0, train=False)
        nxt, lp = pick(jax.lax.dynamic_index_in_dim(logits, col, axis=1, keepdims=False), seed, i)
        done = done | (nxt == eos_id)
        put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            a, v[:, None], jnp.minimum(col + 1, length - 1), axis=1)
        pos = jax.lax.dynamic_index_in_dim(p, col, 1, False) + 1
        return nxt, lp, (put(t, nxt), put(p, pos), put(s, (~done).astype(jnp.int32)), done)

    return None, jax.jit(full, out_shardings=(replicated, replicated, None))


def generate(setup, params, model_state, rows: list[list[int]], max_new_tokens: int, *, vocab_size: int,
             eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             use_cache: bool = True):
    """(tokens, logprobs): per row the generated ids (up to and including EOS) and their
    log-probabilities. Runs under the mesh and rules in context (`setup.mesh`, `setup.rules`).

    With the cache: one prefill call and ``max_new_tokens - 1`` one-token steps. Without it
    (the reference): ``Transformer.__call__`` over the whole [B, prompt + new] buffer for every
    new token, the columns not yet generated being padding (causal, so they change nothing).
    Each is compiled once per model, shapes and sampling setting (``_compiled``), not per call.
    """
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from peer_jax import multihost, sharding
    from peer_jax.training import step as step_lib

    # Filler rows (all padding) make the batch split evenly over the data-parallel devices.
    fill = -len(rows) % sharding.data_parallel_size(setup.mesh, setup.rules)
    tokens, positions, segments = (np.pad(a, ((0, fill), (0, 0))) for a in left_pad(rows))
    b, width = tokens.shape
    length = width + max_new_tokens - 1
    check_routing(nnx.merge(setup.graphdef, params, model_state), b)
    first, advance = _compiled(setup.graphdef, setup.mesh, setup.rules, b, width, length, use_cache, eos_id,
                               (temperature, top_k, top_p, vocab_size))
    seed = np.asarray(jax.random.key_data(jax.random.key(seed)))
    if not use_cache:  # the buffer holds every column the reference will read
        pad = ((0, 0), (0, length - width))
        tokens, positions, segments = (np.pad(a, pad) for a in (tokens, positions, segments))
    shard, shards = multihost.process_row_block(step_lib.batch_sharding(setup.mesh, setup.rules), tokens.shape)
    block = slice(shard * b // shards, (shard + 1) * b // shards)
    batch = step_lib.host_batch({"t": tokens[block], "p": positions[block], "s": segments[block]}, setup, b)

    if use_cache:
        tok, lp, state = first(params, model_state, seed, batch["t"], batch["p"], batch["s"])
    else:
        zeros = jax.device_put(np.zeros(b, np.int32), NamedSharding(setup.mesh, P()))
        filler = batch["s"][:, width - 1] == 0
        tok, lp, state = advance(params, model_state, seed, (batch["t"], batch["p"], batch["s"], filler), zeros, 0)

    real = len(rows)
    out_tok, out_lp = [np.asarray(tok)[:real]], [np.asarray(lp)[:real]]
    done = out_tok[-1] == eos_id
    for i in range(1, max_new_tokens):
        if done.all():
            break
        tok, lp, state = advance(params, model_state, seed, state, tok, i)
        out_tok.append(np.asarray(tok)[:real])
        out_lp.append(np.asarray(lp)[:real])
        done |= out_tok[-1] == eos_id
    toks, lps = np.stack(out_tok, 1), np.stack(out_lp, 1)
    result = []
    for r in range(real):
        hit = np.flatnonzero(toks[r] == eos_id)
        n = int(hit[0]) + 1 if hit.size else toks.shape[1]
        result.append((toks[r, :n].tolist(), lps[r, :n].astype(float).tolist()))
    return [t for t, _ in result], [lp for _, lp in result]


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            raw = open(args.prompt_file, "rb").read()
        except OSError as e:
            raise SampleError(f"--prompt_file={args.prompt_file}: {e.strerror}.") from e
        for n, line in enumerate(raw.splitlines(), 1):
            try:
                prompts.append(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SampleError(f"--prompt_file={args.prompt_file} line {n} holds bytes that are not UTF-8 "
                                  f"(at byte {e.start}); the vocabulary cannot encode them.") from e
    return prompts


def run_sample(cfg, args, prompts: list[str]) -> list[dict]:
    """The samples of `prompts` (each repeated `--num_samples` times) from the checkpoint."""
    from peer_jax import runtime
    from peer_jax.eval import restore_run

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples)
    built, state = restore_run(cfg, args.checkpoint_dir, args.step)
    # Decode reads scattered rows of the expert tables: on 2 MiB pages they cost far fewer TLB
    # misses (docs/inference.md). A no-op off Linux or for arrays on an accelerator.
    runtime.huge_pages(state["params"])
    vocab = built.vocab
    ids = encode_prompts(vocab, prompts, cfg.seq_len, args.max_new_tokens)
    rows = [r for r in ids for _ in range(args.num_samples)]
    texts = [p for p in prompts for _ in range(args.num_samples)]
    with built.context():
        toks, lps = generate(built.setup, state["params"], state["model_state"], rows, args.max_new_tokens,
                             vocab_size=vocab.vocab_size, eos_id=vocab.eos_id, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)
    return [{"prompt": p, "completion": vocab.decode([t for t in tk if t != vocab.eos_id]), "tokens": tk,
             "logprobs": lp} for p, tk, lp in zip(texts, toks, lps)]


def format_samples(samples: list[dict], num_samples: int, eos_id: int) -> str:
    lines = []
    for i, s in enumerate(samples):
        ended = " [EOS]" if s["tokens"] and s["tokens"][-1] == eos_id else ""
        lines.append(f"--- prompt {i // num_samples + 1}, sample {i % num_samples + 1} "
                     f"(mean logprob {sum(s['logprobs']) / len(s['logprobs']):.3f}){ended}")
        lines.append(s["prompt"] + s["completion"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import jax

    from peer_jax import multihost
    from peer_jax.eval import checkpoint_command

    def add_arguments(parser):
        parser.add_argument("--checkpoint_dir", required=True, help="the run's checkpoints directory")
        parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
        parser.add_argument("--prompt_file", default=None, help="a file of prompts, one a line")
        parser.add_argument("--max_new_tokens", type=int, default=64)
        parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        parser.add_argument("--top_k", type=int, default=0, help="0 = off")
        parser.add_argument("--top_p", type=float, default=1.0, help="nucleus mass; 1 = off")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
        parser.add_argument("--no_cache", action="store_true",
                            help="recompute the full forward pass for every token (the reference)")
        parser.add_argument("--json", default=None, help="write the samples to this JSON file")

    def prepare(args):
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples)
        args.prompts = read_prompts(args)

    status, args, samples = checkpoint_command(argv, __doc__.splitlines()[0], add_arguments,
                                               lambda cfg, args: run_sample(cfg, args, args.prompts), prepare)
    if status is not None:
        return status
    if jax.process_index() == 0:
        print(format_samples(samples, args.num_samples, EOS_ID))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"samples": samples}, f, indent=1)
            print(f"wrote {args.json}")
    return multihost.finish(0)


if __name__ == "__main__":
    from peer_jax import cli

    cli.exit_cli(main())
