"""Train (and cache) a SentencePiece vocabulary on the embedded KJV corpus.

    python scripts/train_spm.py [--vocab_size 8192] [--out PATH]

Then train with --gin.config.TrainConfig.vocabulary='"spm"' (the default path is used) or
point config.TrainConfig.spm_path at the model file.
"""

import argparse

from peer_jax.data.spm import train_spm

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--out", default=None, help="model path (default: the cache, see peer_jax/data/vocab.py)")
    a = p.parse_args()
    print(train_spm(a.vocab_size, a.out))
