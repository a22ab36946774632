"""Perplexity of the unigram baseline on eval splits: train-split token frequencies (add-one).

    python scripts/unigram_baseline.py [--task kjv] [--eval_task kjv,pydoc] [--seq_len 128]
        [--max_batches N --batch_size B]

By default it scores every token of each eval split, the tokens `python -m peer_jax.eval`
and a training run's final eval (`eval/<task>/...`) read. `--max_batches N --batch_size B`
scores the first N batches of B packed rows instead, the tokens of the trainer's subset
evals (`eval_subset/<task>/...`, TrainConfig.eval_batches × eval_batch_size). Each line
says how many tokens it covers, of how many.
"""

import argparse

import numpy as np

from peer_jax.data import pipeline, vocab as vocab_lib

if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Default: the whole eval split (what peer_jax.eval and a run's final eval read).")
    p.add_argument("--task", default="kjv", help="training task whose train split gives the frequencies")
    p.add_argument("--eval_task", default="kjv", help="comma-separated eval tasks")
    p.add_argument("--split", default="validation", help="eval split (TrainConfig.eval_split)")
    p.add_argument("--seq_len", type=int, default=128, help="packing length (TrainConfig.seq_len); matters only "
                   "with --max_batches")
    p.add_argument("--max_batches", type=int, default=None,
                   help="score only the first N eval batches (default: the whole split)")
    p.add_argument("--batch_size", type=int, default=None, help="rows per eval batch; required with --max_batches")
    a = p.parse_args()
    if (a.max_batches is None) != (a.batch_size is None):
        p.error("--max_batches and --batch_size go together (the subset is the first max_batches × batch_size rows).")
    v = vocab_lib.vocabulary("byte")
    train = pipeline.packed_arrays(a.task, "train", a.seq_len, v)
    counts = np.bincount(train["targets"][train["weights"] > 0], minlength=v.vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    for task in a.eval_task.split(","):
        val = pipeline.packed_arrays(task, a.split, a.seq_len, v)
        rows = slice(None) if a.max_batches is None else slice(0, a.max_batches * a.batch_size)
        targets, weights = val["targets"][rows], val["weights"][rows]
        ce = -logp[targets[weights > 0]].mean()
        print(f"unigram baseline on {task} {a.split}: loss {ce:.4f} nats/token, perplexity {np.exp(ce):.2f} "
              f"({int(weights.sum())} of {int(val['weights'].sum())} tokens)")
