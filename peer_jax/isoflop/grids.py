"""isoFLOP grids as plain data: budgets, methods (model gin file + grid-defining bindings), shapes.

`configs/isoflop/generate.py` turns a `Grid` into one gin run file per (budget, method, shape)
point, with `TrainConfig.num_steps = round(budget / (train FLOPs per token · batch · seq))`
(FLOPs per token from `peer_jax.flops`, counted on the model the point's gin file builds).

Methods (He 2024, "Mixture of A Million Experts", isoFLOP study): the sparse layer replaces
the FFW of the middle block only (`Transformer.sparse_blocks = "middle"`).
  dense         every block dense (configs/models/dense.gin)
  moe_dropless  128 experts, each the size of the dense MLP, dropless token choice, top-1: the
                study's MoE row (FLOP-matched to dense: one expert per token, nothing dropped)
  moe           128 experts, each the size of the dense MLP, expert-choice routing (the paper's
                stated setting; kept as a second, separately labelled MoE row)
  pkm    1024² memories, h = 8 heads, top-k 32, query BatchNorm
  peer   1024² single-neuron experts, h = 8 heads, top-k 16, query BatchNorm
The model gin file of a method sets everything else about its layer (d_key, activation,
compute mode, ...); `bindings` pin the hyperparameters that define the grid, so the emitted
file states them even if the model file changes.

Why frozen dataclasses and not ml-collections `ConfigDict`s (big_vision's habit): in big_vision
the ConfigDict *is* the run's configuration, overridden from the command line. Here gin is: a
point's gin file is the record a run is reproduced from, and `--gin.NAME=VALUE` overrides it.
A grid only generates those files, and the committed files must be exactly what the committed
grid generates (`generate.py --check`, tests/test_isoflop.py), so a grid is changed by editing
this module, never per invocation; what a ConfigDict adds (command-line overrides, field
references, locking) would have nothing to do. Frozen dataclasses give what is used: declared
fields, immutability and `dataclasses.replace` for derived grids (mini2 from mini, ablate from
mini2). So ml-collections is not a dependency of peer_jax (clu still pulls it in).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    model_gin: str  # included after configs/base.gin
    imports: tuple[str, ...] = ()  # modules the bindings need, e.g. "peer_jax.layers.peer"
    bindings: tuple[tuple[str, object], ...] = ()  # (gin name, python value)


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    d_model: int
    num_heads: int

    @property
    def tag(self) -> str:
        return f"L{self.num_layers}_d{self.d_model}_h{self.num_heads}"


def budget_tag(budget: float) -> str:
    """6e18 → '6e18', 1.5e13 → '1.5e13' (point names, fit labels)."""
    mantissa, exponent = f"{budget:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    budgets: dict[float, tuple[Shape, ...]]  # budget (training FLOPs) -> model shapes
    methods: tuple[Method, ...]
    batch_size: int  # sequences per optimizer step
    seq_len: int
    vocab_size: int  # model vocabulary (after rounding up to TrainConfig.vocab_multiple)
    train: tuple[tuple[str, object], ...]  # further TrainConfig bindings (data, eval, logging)
    model: tuple[tuple[str, object], ...] = ()  # further transformer.Transformer bindings (e.g. dtype)
    warmup_fraction: float = 0.02
    min_warmup: int = 10  # warm-up floor in steps ...
    max_warmup_fraction: float = 1.0  # ... but never more than this share of the run
    description: str = ""
    # method name -> optim.make_optimizer.peak_lr written into its points (else base.gin's 3e-3)
    peak_lr: dict[str, float] = dataclasses.field(default_factory=dict)
    # Width rule: a point of width d trains at peak_lr[method] · min(1, lr_base_width / d) (None: no rule)
    lr_base_width: int | None = None
    # Validation curve: evaluate about this many times per run on the eval_batches subset (None:
    # once, at the end); the final eval reads the whole split either way
    evals_per_run: int | None = None
    # method name -> further TrainConfig bindings of its points (e.g. the pod mesh and rules)
    method_train: dict[str, tuple[tuple[str, object], ...]] = dataclasses.field(default_factory=dict)
    # method name -> further transformer.Transformer bindings of its points (after `model`)
    method_model: dict[str, tuple[tuple[str, object], ...]] = dataclasses.field(default_factory=dict)
    # method name -> its own budgets and shapes, in place of `budgets` (e.g. each method's optimum)
    method_budgets: dict[str, dict[float, tuple[Shape, ...]]] = dataclasses.field(default_factory=dict)


def method_budgets(grid: Grid, method: str) -> dict[float, tuple[Shape, ...]]:
    """The budgets and shapes of one method's points."""
    return grid.method_budgets.get(method, grid.budgets)


def point_peak_lr(grid: Grid, method: str, shape: Shape) -> float | None:
    """The peak LR a point of the grid trains at (None: base.gin's)."""
    if method not in grid.peak_lr:
        return None
    lr = grid.peak_lr[method]
    return lr * min(1.0, grid.lr_base_width / shape.d_model) if grid.lr_base_width else lr


def warmup_steps(grid: Grid, num_steps: int) -> int:
    return max(round(grid.warmup_fraction * num_steps),
               min(grid.min_warmup, round(grid.max_warmup_fraction * num_steps)))


def _shapes(*triples) -> tuple[Shape, ...]:
    return tuple(Shape(*t) for t in triples)


def _methods(model_files: dict[str, str], moe: dict, moe_dropless: dict, pkm: dict, peer: dict
             ) -> tuple[Method, ...]:
    def b(prefix, kw):
        return tuple((f"{prefix}.{k}", v) for k, v in kw.items())

    return (
        Method("dense", model_files["dense"]),
        Method("moe_dropless", model_files["moe_dropless"], ("peer_jax.layers.moe",), b("moe.MoE", moe_dropless)),
        Method("moe", model_files["moe"], ("peer_jax.layers.moe",), b("moe.MoE", moe)),
        Method("pkm", model_files["pkm"], ("peer_jax.layers.pkm",), b("pkm.PKM", pkm)),
        Method("peer", model_files["peer"], ("peer_jax.layers.peer",), b("peer.PEER", peer)),
    )


# ----------------------------------------------------------------------------- the paper's grid
# Batch 128 × 2048 tokens, C4, T5's 32k SentencePiece vocabulary. Shapes (not given in the
# paper) keep head_dim = 64 and span ~19M-925M non-embedding parameters, centred on the
# Chinchilla-optimal size of each budget (≈ 150M at 6e18, ≈ 300M at 2e19 non-embedding).
PAPER_SHAPES = _shapes(
    (6, 512, 8), (8, 640, 10), (10, 768, 12), (12, 896, 14), (14, 1024, 16), (16, 1280, 20), (20, 1536, 24),
    (24, 1792, 28),
)
# Pod settings written into every paper point, so that a pod run and an AOT compile need no mesh
# flags. `model` = 2 divides every shape's heads (8-28) and, with a -1 data axis, leaves
# data x expert = devices / 2 <= the batch of 128 sequences on up to 256 chips (v5e-256), while
# any even device count down to 2 (4 x expert for the MoEs) still works. The MoEs put their 128
# experts over `expert` = 4. PEER/PKM keep their tables in place (`memory_parallel`: columns split
# over the expert x model group, rows replicated over data = 4, the tokens' routing and activations
# sent to them). Of the group sizes compiled for a v5e-256 (scripts/memory_parallel_table.py), 4
# replicas (G = 64) moves the fewest bytes for PEER, and for PKM the least wire time (G = 32 moves
# 2 % fewer bytes but more of them as all-reduces). Measured in docs/pod_scale.md.
_DATA_MODEL = (("mesh_shape", (-1, 1, 2)), ("sharding_rules", "default"))
_EXPERT_PARALLEL = (("mesh_shape", (-1, 4, 2)), ("sharding_rules", "default"))
_MEMORY_PARALLEL = (("mesh_shape", (4, -1, 2)), ("sharding_rules", "memory_parallel"))
PAPER_POD = {"dense": _DATA_MODEL, "moe": _EXPERT_PARALLEL, "moe_dropless": _EXPERT_PARALLEL,
             "pkm": _MEMORY_PARALLEL, "peer": _MEMORY_PARALLEL}
PAPER = Grid(
    name="paper",
    budgets={6e18: PAPER_SHAPES[:7], 2e19: PAPER_SHAPES[1:]},
    methods=_methods(
        {"dense": "configs/models/dense.gin", "moe": "configs/models/moe.gin",
         "moe_dropless": "configs/models/moe_dropless.gin", "pkm": "configs/models/pkm.gin",
         "peer": "configs/models/peer.gin"},
        moe=dict(num_experts=128, routing="expert_choice", capacity_factor=1.0),
        moe_dropless=dict(num_experts=128, routing="dropless", top_k=1),
        pkm=dict(num_experts=1024**2, heads=8, top_k=32, query_batchnorm=True),
        peer=dict(num_experts=1024**2, heads=8, top_k=16, query_batchnorm=True),
    ),
    batch_size=128,
    seq_len=2048,
    vocab_size=32000,
    # bf16 activations and matmuls, float32 parameters and optimizer state; the ordinary blocks
    # as a scan (compile time independent of depth; docs/pod_scale.md).
    model=(("dtype", "bfloat16"), ("scan_layers", True)),
    method_train=PAPER_POD,
    # No remat: with memory-parallel tables PKM keeps 57 % of a v5e's HBM without it (it needed
    # 'minimal' remat with `fsdp_expert_tables`), and a recomputed block would repeat the
    # lookup's routing all-gather (docs/pod_scale.md).
    train=(
        ("train_task", "c4"),
        ("eval_tasks", ["c4"]),
        ("streaming", True),
        ("vocabulary", "spm"),
        ("spm_path", "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"),
        ("log_every", 100),
        ("eval_every", 5000),
        ("eval_batches", 100),
        ("checkpoint_every", 1000),
        ("keep_checkpoints", 2),
        ("progress_bar", False),
    ),
    warmup_fraction=0.02,
    description="He (2024) isoFLOP study on C4, sparse layer in the middle block.",
)

# ----------------------------------------------------------------------------- the CPU mini grid
# Byte-level KJV (the embedded corpus), 16 × 128 tokens per step, evaluated on KJV validation
# and on Python's help topics (out of domain). Sparse layers scaled down: 16 experts (C = 1
# slot per expert for the 16-sequence routing group, i.e. one expert per token), 128² memories
# / experts. Budgets 1e12 and 3e12 (3× apart, like the paper's 6e18 and 2e19): 5 and 6 shapes,
# spanning the compute-optimal size of each (the first 3e12 sweep, on L2-L5 only, found every
# method's optimum at its smallest shape). All 44 points: about 90 minutes on 2 idle CPU cores.
MINI_MODEL_FILES = {"dense": "configs/models/dense.gin", "moe": "configs/models/moe_tiny.gin",
                    "moe_dropless": "configs/models/moe_dropless_tiny.gin",
                    "pkm": "configs/models/pkm_tiny.gin", "peer": "configs/models/peer_tiny.gin"}
MINI_SPARSE = dict(
    moe=dict(num_experts=16, routing="expert_choice", capacity_factor=1.0),
    moe_dropless=dict(num_experts=16, routing="dropless", top_k=1),
    pkm=dict(num_experts=128**2, heads=4, top_k=16, query_batchnorm=True),
    peer=dict(num_experts=128**2, heads=4, top_k=8, query_batchnorm=True),
)
MINI_SHAPES = _shapes((1, 32, 1), (1, 48, 2), (2, 48, 2), (2, 64, 2), (3, 96, 3), (4, 128, 4), (5, 160, 5))
MINI = Grid(
    name="mini",
    budgets={1e12: MINI_SHAPES[:5], 3e12: MINI_SHAPES[1:]},
    methods=_methods(MINI_MODEL_FILES, **MINI_SPARSE),
    batch_size=16,
    seq_len=128,
    vocab_size=384,  # 259 byte ids rounded up to TrainConfig.vocab_multiple = 128
    train=(
        ("train_task", "kjv"),
        ("eval_tasks", ["kjv", "pydoc"]),
        ("vocabulary", "byte"),
        ("log_every", 20),
        ("eval_batches", 96),
        ("checkpoint_every", 200),
        ("keep_checkpoints", 2),
        ("progress_bar", False),
        ("tensorboard", False),
    ),
    warmup_fraction=0.05,
    description="CPU-sized isoFLOP study on the embedded KJV corpus (bytes); eval on KJV validation and pydoc.",
)

# ----------------------------------------------------------------------------- the CPU study grid
# What issue 15 asks of the mini study: the MoE row is the dropless top-1 MoE (expert choice stays
# as a second row), each method trains at a peak LR chosen by the 1e12 sweep
# (results/isoflop_mini_lr, on *_1e12_L2_d48_h2, the shape nearest every method's 1e12 optimum;
# 3e-3, 1e-2, 3e-2 for all, 1e-1 where 3e-2 won: one seed per cell),
# a third budget 1e13 on shapes up to L6 d256, and a third held-out English eval set
# (Shakespeare). Everything else as MINI.
MINI2_SHAPES = MINI_SHAPES + _shapes((6, 192, 6), (6, 256, 8))
# The sweep's winners were dense 3e-2, dropless MoE 1e-2, MoE-EC 3e-2, PKM 1e-2, PEER 1e-2, but
# 1e-2 is within seed noise of the best for every method there, and 3e-2 does not transfer to a
# wider model: dense_1e13_L3_d96_h3 reached KJV loss 1.314 at 3e-2 against 1.171 at 1e-2
# (results/isoflop_mini2_lrcheck). So every method uses 1e-2 until an LR sweep at a larger shape
# says how the LR should scale with width.
MINI2_PEAK_LR = {"dense": 1e-2, "moe_dropless": 1e-2, "moe": 1e-2, "pkm": 1e-2, "peer": 1e-2}
# Dropless MoE's grouped matmuls as padded blocks of 32 rows: on CPU `ragged_dot` runs all 16
# experts on every pair; blocks train the same model 2.3x faster, 1.07x a dense step
# (benchmarks/moe_dropless_cpu.py). Different rounding from ragged_dot, same model.
MINI2_SPARSE = {**MINI_SPARSE, "moe_dropless": {**MINI_SPARSE["moe_dropless"], "grouped_matmul": "padded_blocks",
                                                "block_size": 32}}
MINI2 = dataclasses.replace(
    MINI,
    name="mini2",
    methods=_methods(MINI_MODEL_FILES, **MINI2_SPARSE),
    # L1 d24 at 1e12 and L1 d32 at 3e12: PEER's and PKM's optima sat at the smallest shape of
    # both budgets in seed 0 (1e12: L1 d32; 3e12: L1 d48). L1 d16 at 1e12: with d24 added, the
    # optima of PEER, PKM and MoE-EC still sat at the smallest shape (PEER's vertex below it).
    # L1 d48 at 1e13: PEER's seed-0 optimum there was L2 d48, the smallest 1e13 shape.
    budgets={1e12: _shapes((1, 16, 1), (1, 24, 1)) + MINI2_SHAPES[:5], 3e12: MINI2_SHAPES[:7], 1e13: MINI2_SHAPES[1:]},
    # XLA:CPU pinned to AVX2 and 2 intra-op threads (peer_jax/host.py): a point re-runs bit for
    # bit on any host of its CPU model with at least 2 cores, and within an ulp or so of its
    # losses on other x86-64 CPUs with AVX2 (docs/reproducibility.md).
    train=tuple((k, ["kjv", "shakespeare", "pydoc"] if k == "eval_tasks" else v) for k, v in MINI.train)
    + (("xla_cpu_pin", "AVX2"), ("xla_cpu_threads", 2)),
    peak_lr=MINI2_PEAK_LR,
    description="CPU isoFLOP study on the embedded KJV corpus (bytes), per-method peak LR from the 1e12 sweep; "
                "eval on KJV validation, Shakespeare and pydoc.",
)

# ----------------------------------------------------------------------------- the CPU rerun grid
# mini2 with what issue 25's checks found (results/routing_health, results/isoflop_mini2_lr13):
# * peak LR 1e-2 · min(1, 64 / d): 1e-2 held at d = 48, 64 and 5e-3 beat it by 0.056 nats at
#   d = 128 for PEER and dense alike (3e-3 within 0.007 of 5e-3);
# * PEER's sub-keys train at 0.1 × the LR (optimizer group "keys"): its dead sub-keys go, usage
#   55 → 79 % at the 1e13 optimum at no worse loss. PKM keeps mini2's recipe, its best measured:
#   the same group cost it 0.020 nats at its 1e12 optimum and was within seed noise at 1e13
#   (−0.004), usage 63 → 94 % and 93 → 100 % (results/routing_health, pkm_*keys_lr0.1);
# * warm-up 5 % with a floor of 100 steps (5 × Adam's b2 horizon 1 / (1 − 0.95)), capped at a
#   quarter of the run for the shortest points;
# * about 10 evals per run on the first 8 batches of each set (validation curves), the final
#   eval on the same 96 batches as mini2's points, plus `kjv_novel` (KJV validation without the
#   verses that repeat training text).
# Shapes and budgets as mini2, plus L1 d24 at 3e12: under this recipe PEER's seed-0 3e12 loss was
# lowest at the smallest shape, L1 d32 (vertex below it), and PKM's and MoE's at the next, L1 d48.
# Bindings beyond mini2 are written only into the points that need them (dense and MoE points
# have no optimizer groups, so their optimizer is mini2's).
KEYS_GROUP = ("optim.make_optimizer.param_groups", {"keys": {"lr_scale": 0.1}})
KEYS_GROUP_METHODS = ("peer",)
MINI3 = dataclasses.replace(
    MINI2,
    name="mini3",
    methods=tuple(dataclasses.replace(m, bindings=m.bindings + (KEYS_GROUP,)) if m.name in KEYS_GROUP_METHODS else m
                  for m in MINI2.methods),
    train=tuple((k, ["kjv", "kjv_novel", "shakespeare", "pydoc"] if k == "eval_tasks" else 8 if k == "eval_batches"
                 else v) for k, v in MINI2.train) + (("final_eval_batches", 96),),
    budgets={**MINI2.budgets, 3e12: _shapes((1, 24, 1)) + MINI2.budgets[3e12]},
    lr_base_width=64,
    warmup_fraction=0.05,
    min_warmup=100,
    max_warmup_fraction=0.25,
    evals_per_run=10,
    description="CPU isoFLOP rerun on the embedded KJV corpus (bytes): mini2 with peak LR 1e-2 · min(1, 64/d), "
                "PEER's sub-keys at 0.1 × LR, warm-up ≥ 100 steps, 10 evals per run; eval on KJV validation, "
                "its novel verses, Shakespeare and pydoc.",
)

# ----------------------------------------------------------------------------- the 1e13 optima on verse
# Issue 25, item 3: the 1e13 optima retrained on a corpus that no point repeats.
# `gutenberg_verse` (peer_jax/data/verse.py) holds about 26 × the KJV training split, so a
# 1e13 point reads a fraction of an epoch (grid.md, column `epochs`). mini3's recipe; one shape
# per method, mini2's seed-0 1e13 optimum (results/superseded/isoflop_mini2/seed0: the lowest final KJV
# loss of the method's 1e13 shapes); MoE-EC is left out (last at every budget). Evaluated on
# verse validation and, out of domain, on KJV, Shakespeare and pydoc.
VERSE13_SHAPES = {"dense": Shape(2, 64, 2), "moe_dropless": Shape(2, 64, 2), "pkm": Shape(2, 64, 2),
                  "peer": Shape(2, 48, 2)}
VERSE13 = dataclasses.replace(
    MINI3,
    name="verse13",
    methods=tuple(m for m in MINI3.methods if m.name in VERSE13_SHAPES),
    budgets={1e13: tuple(dict.fromkeys(VERSE13_SHAPES.values()))},
    method_budgets={m: {1e13: (shape,)} for m, shape in VERSE13_SHAPES.items()},
    train=tuple((k, "gutenberg_verse" if k == "train_task"
                 else ["gutenberg_verse", "kjv", "shakespeare", "pydoc"] if k == "eval_tasks" else v)
                for k, v in MINI3.train),
    peak_lr={m: MINI3.peak_lr[m] for m in VERSE13_SHAPES},
    description="mini2's 1e13 optimum of dense, dropless MoE, PKM and PEER retrained with mini3's recipe on "
                "Gutenberg verse (bytes; under one epoch); eval on verse validation, KJV, Shakespeare and pydoc.",
)

# ----------------------------------------------------------------------------- PEER ablations
# The paper's Fig. 3a (total experts N at fixed h·k), Fig. 3b (active experts h·k at fixed N) and
# Table 2 (query BatchNorm on/off at two N), at CPU scale: every variant trains PEER's best
# mini2 1e12 shape (seed 0: L1 d24, KJV loss 1.294 against 1.327 at L1 d32; the smallest shape
# sampled, so the true optimum may be smaller still) for the 1e12 budget, so a variant with
# more active experts trains fewer steps (isoFLOP). Method names: peer_n<√N>_h<h>k<k>[_nobn];
# the N = 128², h = 4, k = 8, BN point is mini2's PEER and serves all three.
ABLATE_SHAPE = Shape(1, 24, 1)


def _peer_variant(sqrt_n: int, heads: int, top_k: int, bn: bool = True) -> Method:
    name = f"peer_n{sqrt_n}_h{heads}k{top_k}" + ("" if bn else "_nobn")
    return Method(name, "configs/models/peer_tiny.gin", ("peer_jax.layers.peer",), (
        ("peer.PEER.num_experts", sqrt_n**2), ("peer.PEER.heads", heads), ("peer.PEER.top_k", top_k),
        ("peer.PEER.query_batchnorm", bn)))


ABLATE_N = tuple(_peer_variant(n, 4, 8) for n in (16, 32, 64, 128))  # Fig. 3a: h·k = 32
ABLATE_HK = tuple(_peer_variant(128, h, 8) for h in (1, 2, 4, 8))  # Fig. 3b: h·k = 8 .. 64, N = 128²
ABLATE_BN = tuple(_peer_variant(n, 4, 8, bn) for n in (32, 128) for bn in (True, False))  # Table 2
ABLATE = dataclasses.replace(
    MINI2,
    name="ablate",
    budgets={1e12: (ABLATE_SHAPE,)},
    methods=tuple({m.name: m for m in ABLATE_N + ABLATE_HK + ABLATE_BN}.values()),
    peak_lr={m.name: MINI2_PEAK_LR["peer"] for m in ABLATE_N + ABLATE_HK + ABLATE_BN},
    method_train={},
    description="PEER ablations (paper Fig. 3a, Fig. 3b, Table 2) at the mini2 1e12 optimum of PEER, KJV bytes.",
)

GRIDS = {g.name: g for g in (PAPER, MINI, MINI2, MINI3, VERSE13, ABLATE)}
