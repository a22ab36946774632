"""Perplexity of the unigram baseline on an eval split: train-split token frequencies (add-one).

    python scripts/unigram_baseline.py [--task kjv] [--eval_task kjv] [--seq_len 128]
"""

import argparse

import numpy as np

from peer_jax.data import pipeline, vocab as vocab_lib

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="kjv")
    p.add_argument("--eval_task", default="kjv")
    p.add_argument("--seq_len", type=int, default=128)
    a = p.parse_args()
    v = vocab_lib.vocabulary("byte")
    train = pipeline.packed_arrays(a.task, "train", a.seq_len, v)
    val = pipeline.packed_arrays(a.eval_task, "validation", a.seq_len, v)
    counts = np.bincount(train["targets"][train["weights"] > 0], minlength=v.vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    ce = -logp[val["targets"][val["weights"] > 0]].mean()
    print(f"unigram baseline on {a.eval_task} validation: loss {ce:.4f} nats/token, perplexity {np.exp(ce):.2f}")
