"""Which experts can the product-key router reach? A static check of a PEER/PKM model on eval data.

    python scripts/routing_reach.py --gin_file=RUN/operative_config.gin [--checkpoint_dir=RUN/checkpoints]
        [--task=kjv] [--max_batches=96] [--out=FILE.json] [--gin.NAME=VALUE ...]

What it reports: `peer_jax/routing_reach.py`.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peer_jax
from peer_jax import routing_reach  # noqa: E402

if __name__ == "__main__":
    sys.exit(routing_reach.main())
