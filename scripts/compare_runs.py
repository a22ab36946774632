"""Table of finished runs: parameters, active parameters per token, step time, eval perplexity.

    python scripts/compare_runs.py runs/tiny_cpu runs/tiny_cpu_moe runs/tiny_cpu_pkm runs/tiny_cpu_peer

What each column is and what a run directory must hold: `peer_jax/compare_runs.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peer_jax
from peer_jax import compare_runs  # noqa: E402

if __name__ == "__main__":
    compare_runs.main()
