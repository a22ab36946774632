"""Writes the gin run files of the isoFLOP grids into configs/isoflop/<grid>/ (`--help` for flags).

    python configs/isoflop/generate.py --grid mini            # writes configs/isoflop/mini/
    python configs/isoflop/generate.py --grid paper --check   # are the shipped files current?

The grids are `peer_jax/isoflop/grids.py`; the generator is `peer_jax/isoflop/generate.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's peer_jax
from peer_jax.isoflop import generate  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate.main())
