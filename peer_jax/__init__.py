"""peer_jax: PEER (Mixture of A Million Experts) and its isoFLOP study in JAX/Flax NNX."""

from flax import nnx as _nnx

# Parameters are created sharded by jitting the initialiser with explicit out_shardings
# (peer_jax.training.step.train_state_spec), so Flax's eager per-variable sharding is turned
# off: modules can then be built anywhere (tests, eval_shape) without a mesh in context.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
