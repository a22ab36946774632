"""Which experts can the product-key router reach? A static check of a PEER/PKM model on eval data.

    python scripts/routing_reach.py --gin_file=RUN/operative_config.gin [--checkpoint_dir=RUN/checkpoints]
        [--task=kjv] [--max_batches=96] [--out=FILE.json] [--gin.NAME=VALUE ...]

Without --checkpoint_dir the model is the run's initialisation (its seed). For every product-key
layer it collects the router's input x and BatchNormed queries q on the eval tokens (padding
excluded) and reports, per layer:

- ``usage``: share of the N = n² experts in any token's top-k (what the eval's usage counts);
- ``half_usage``: share of the n sub-keys of each half that occur in some retrieved pair;
- ``usage_halves_shuffled``: usage when q₂ is paired with another token's q₁ (the halves made
  independent, each keeping its own distribution): if this is much higher than ``usage``, the
  dependence between the two halves of the query limits which pairs (a, b) are reached;
- ``usage_gaussian``: usage for Gaussian queries with the eval queries' per-dimension mean and
  variance (no dependence between any dimensions) against the same sub-keys;
- ``x_eff_rank``, ``q_eff_rank``: participation ratio (Σλ)²/Σλ² of the covariance of x and of
  each head's query (mean over heads), against d_model and d_key;
- ``q2_from_q1_r2``: share of the variance of q₂ that a least-squares linear map of q₁ explains
  (mean over heads);
- ``key_norm_cv``: coefficient of variation of the sub-key norms.
"""

from __future__ import annotations

import argparse
import json
import sys


def _eff_rank(cov):
    import numpy as np

    lam = np.clip(np.linalg.eigvalsh(cov), 0, None)
    return float(lam.sum() ** 2 / max((lam**2).sum(), 1e-30))


def _usage(q, sub_keys, top_k, n):
    """Share of the n² items in the top-k of any query (q: [tokens, heads, d_key] numpy)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from peer_jax.layers.product_keys import product_key_topk

    topk = jax.jit(lambda q: product_key_topk(q, jnp.asarray(sub_keys), top_k)[1])
    hit = np.zeros(n * n, bool)
    for s in range(0, len(q), 8192):
        hit[np.asarray(topk(jnp.asarray(q[s:s + 8192]))).reshape(-1)] = True
    return hit


def layer_report(x, q, sub_keys, top_k, seed=0):
    import numpy as np

    n = sub_keys.shape[-2]
    if sub_keys.ndim == 4:
        raise ValueError("per-head sub-keys are not supported by this check.")
    rng = np.random.default_rng(seed)
    hit = _usage(q, sub_keys, top_k, n)
    rows, cols = hit.reshape(n, n).any(1), hit.reshape(n, n).any(0)
    half = q.shape[-1] // 2
    shuffled = q.copy()
    shuffled[..., half:] = q[rng.permutation(len(q))][..., half:]
    mu, sd = q.mean(0), q.std(0)
    gauss = (mu + sd * rng.standard_normal(q.shape)).astype(np.float32)
    r2, q_rank = [], []
    for h in range(q.shape[1]):
        qh = q[:, h] - q[:, h].mean(0)
        q1, q2 = qh[:, :half], qh[:, half:]
        coef, *_ = np.linalg.lstsq(q1, q2, rcond=None)
        r2.append(1.0 - ((q2 - q1 @ coef) ** 2).sum() / (q2**2).sum())
        q_rank.append(_eff_rank(np.cov(qh, rowvar=False)))
    norms = np.linalg.norm(sub_keys, axis=-1)
    return {
        "tokens": int(len(q)),
        "usage": float(hit.mean()),
        "half_usage": [float(rows.mean()), float(cols.mean())],
        "usage_halves_shuffled": float(_usage(shuffled, sub_keys, top_k, n).mean()),
        "usage_gaussian": float(_usage(gauss, sub_keys, top_k, n).mean()),
        "x_eff_rank": _eff_rank(np.cov(x - x.mean(0), rowvar=False)),
        "d_model": int(x.shape[-1]),
        "q_eff_rank": float(np.mean(q_rank)),
        "d_key": int(q.shape[-1]),
        "q2_from_q1_r2": float(np.mean(r2)),
        "key_norm_cv": [float(norms[i].std() / norms[i].mean()) for i in range(2)],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", required=True)
    parser.add_argument("--checkpoint_dir", default=None)
    parser.add_argument("--task", default="kjv")
    parser.add_argument("--max_batches", type=int, default=96)
    parser.add_argument("--out", default=None)
    args, bindings = parser.parse_known_args(argv)

    import gin
    import jax
    import numpy as np
    from flax import nnx

    from peer_jax import gin_utils, sharding
    from peer_jax.data import pipeline
    from peer_jax.layers.product_key_router import ProductKeyRouter
    from peer_jax.training import build as build_lib, checkpoint as ckpt, step as step_lib
    from peer_jax.training.config import TrainConfig

    gin_utils.parse([args.gin_file], [b.removeprefix("--gin.") for b in bindings])
    cfg = gin.get_configurable(TrainConfig)()
    built = build_lib.build(cfg, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    vocab, setup, graphdef = built.vocab, built.setup, built.setup.graphdef

    captured, top_ks = [], []
    original = ProductKeyRouter.queries

    def recording(self, x, **kw):  # runs while `route` is traced
        q = original(self, x, **kw)
        captured.append((x, q, self.sub_keys[...]))
        top_ks.append(self.top_k)
        return q

    with built.context():
        if args.checkpoint_dir:
            mngr = ckpt.manager(args.checkpoint_dir, keep=cfg.keep_checkpoints)
            state, _ = ckpt.restore(mngr, built.abstract_state, built.shardings, expect_meta=built.meta())
            mngr.close()
        else:
            state = built.init_state()
        params, model_state, step = state["params"], state["model_state"], int(state["step"])

        @jax.jit
        def route(params, model_state, batch):
            captured.clear()
            top_ks.clear()
            model = nnx.merge(graphdef, params, model_state)
            model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                  mask=batch["segment_ids"] > 0, train=False)
            return captured[:]

        ProductKeyRouter.queries = recording
        try:
            xs, qs, keys = None, None, []
            for batch in pipeline.eval_stream(args.task, cfg.eval_split, cfg.seq_len, vocab,
                                              cfg.eval_batch_size or cfg.batch_size, args.max_batches,
                                              eval_data_dir=cfg.eval_data_dir):
                out = route(params, model_state, step_lib.host_batch(batch, setup))
                valid = np.asarray(batch["weights"]) > 0
                if xs is None:
                    xs, qs = [[] for _ in out], [[] for _ in out]
                keys = [k for *_, k in out]
                for i, (x, q, _) in enumerate(out):
                    xs[i].append(np.asarray(x)[valid])
                    qs[i].append(np.asarray(q)[valid])
        finally:
            ProductKeyRouter.queries = original
    report = {"step": step, "task": args.task, "layers": []}
    for i, (k, t) in enumerate(zip(keys, top_ks)):
        report["layers"].append(layer_report(np.concatenate(xs[i]).astype(np.float64),
                                             np.concatenate(qs[i]), np.asarray(k), int(t)))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
