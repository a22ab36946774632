"""Every gin file in configs/ parses, builds (abstractly at full size), and tiny ones run."""

from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax import gin_utils
from peer_jax.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
FRAGMENT_DIRS = ("models", "ablations")  # files that are read on top of base.gin
# The generated isoFLOP points are checked (parse, abstract build, budget) by test_isoflop.py.
GIN_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.gin")
                   if "isoflop" not in p.parts)
RUN_FOR_REAL = ("configs/runs/", "_tiny.gin")  # small enough to build and run one forward pass


def test_there_are_configs():
    assert "configs/runs/tiny_cpu.gin" in GIN_FILES and "configs/models/dense.gin" in GIN_FILES


@pytest.mark.parametrize("path", GIN_FILES)
def test_gin_file_parses_and_builds(path):
    files = [path]
    if Path(path).parent.name in FRAGMENT_DIRS:
        files = ["configs/base.gin", path]
    gin_utils.parse(files, [])
    cfg = gin.get_configurable(TrainConfig)()
    vocab = 384
    abstract = nnx.eval_shape(lambda: cfg.model(vocab, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n > 0
    if path.startswith(RUN_FOR_REAL[0]) or path.endswith(RUN_FOR_REAL[1]):
        assert n < 10_000_000
        model = cfg.model(vocab, rngs=nnx.Rngs(0))
        tokens = jnp.ones((2, 16), jnp.int32)
        logits = model(tokens, mask=jnp.ones((2, 16), bool), train=True)
        assert logits.shape == (2, 16, vocab) and bool(jnp.all(jnp.isfinite(logits)))
    gin.clear_config()
