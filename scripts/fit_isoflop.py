"""Fits isoFLOP curves to finished sweep runs, with bootstrap intervals over seeds.

    python scripts/fit_isoflop.py --root results/isoflop_mini3/seed0 --root results/isoflop_mini3/seed1 \
        --root results/isoflop_mini3/seed2 --out results/isoflop_mini3/fit --unique_tokens 4010368

One `--root` per seed. `--help` for the flags; what it reads and writes: `peer_jax/isoflop/report.py`;
the estimates: `peer_jax/isoflop/fit.py`; the intervals: `peer_jax/isoflop/bootstrap.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peer_jax
from peer_jax.isoflop import report  # noqa: E402

if __name__ == "__main__":
    sys.exit(report.main())
