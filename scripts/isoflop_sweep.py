"""Runs an isoFLOP grid: one `python -m peer_jax.train` per point, skipping finished points.

    python scripts/isoflop_sweep.py configs/isoflop/mini --root runs/isoflop_mini [--jobs 1]
    python scripts/isoflop_sweep.py configs/isoflop/paper --root gs://BUCKET/isoflop --print_commands

`--help` for the flags; what it does: `peer_jax/isoflop/sweep.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peer_jax
from peer_jax.isoflop import sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep.main())
