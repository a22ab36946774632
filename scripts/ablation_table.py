"""Tables and plots of the PEER ablations (paper Fig. 3a, Fig. 3b, Table 2) from finished runs.

    python scripts/ablation_table.py --root results/ablate/seed0 --root results/ablate/seed1 \
        --out results/ablate/report

`--help` for the flags and what it writes; the code: `peer_jax/isoflop/ablation.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peer_jax
from peer_jax.isoflop import ablation  # noqa: E402

if __name__ == "__main__":
    sys.exit(ablation.main())
