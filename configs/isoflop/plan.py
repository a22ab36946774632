"""Plans the CPU wall time of an isoFLOP grid from measured runs (`--help` for flags).

    python configs/isoflop/plan.py configs/isoflop/mini2 --measured results/superseded/isoflop_mini \
        --measured results/superseded/isoflop_mini_seed1 --measured 'results/isoflop_mini_lr/*' [--budgets 1e13]

How the prediction is made: `peer_jax/isoflop/plan.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's peer_jax
from peer_jax.isoflop import plan  # noqa: E402

if __name__ == "__main__":
    sys.exit(plan.main())
