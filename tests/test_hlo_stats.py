"""Collective bytes read from compiled HLO (peer_jax/hlo_stats.py), on 8 fake CPU devices:
programs whose collectives are known by construction, including ones inside a scan."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from peer_jax.hlo_stats import collective_bytes

N = 8


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N,), ("d",), axis_types=(AxisType.Auto,))


def counted(fn, *args):
    return collective_bytes(jax.jit(fn).lower(*args).compile().as_text())


def test_all_reduce_in_a_scan_counts_once_per_iteration_and_all_gather_its_result(mesh):
    def f(x):
        def body(c, _):
            s = jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"), out_specs=P(),
                              check_vma=False)(c)
            return c + s.sum(), None

        c, _ = jax.lax.scan(body, x, None, length=5)
        return jax.shard_map(lambda a: jax.lax.all_gather(a, "d", tiled=True), mesh=mesh, in_specs=P("d"),
                             out_specs=P(), check_vma=False)(c)

    r = counted(f, jnp.ones((8 * N, 16), jnp.float32))
    shard = 8 * 16 * 4  # one device's [8, 16] float32 block
    assert r["by_kind"]["all-reduce"] == {"count": 5, "bytes": 5 * shard}
    assert r["by_kind"]["all-gather"] == {"count": 1, "bytes": N * shard}  # what each device receives
    assert r["total_bytes"] == 5 * shard + N * shard
    assert r["unknown_trip_count_loops"] == []


def test_reduce_scatter_counts_its_larger_operand(mesh):
    f = jax.shard_map(lambda a: jax.lax.psum_scatter(a, "d", scatter_dimension=0, tiled=True), mesh=mesh,
                      in_specs=P(), out_specs=P("d"), check_vma=False)
    r = counted(f, jnp.ones((4 * N, 32), jnp.float32))  # (CPU reduces bf16 in f32: float32 keeps it exact)
    # Each device contributes its whole [32, 32] operand and keeps a [4, 32] slice. XLA
    # may express it as a reduce-scatter or as an all-reduce plus a slice; either way the
    # operand is what a device sends.
    moved = {k: v for k, v in r["by_kind"].items() if v["count"]}
    assert set(moved) <= {"reduce-scatter", "all-reduce"} and len(moved) == 1, moved
    assert next(iter(moved.values())) == {"count": 1, "bytes": 4 * N * 32 * 4}


def test_no_collectives_and_bad_text():
    r = counted(lambda x: x * 2, jnp.ones((4,)))
    assert r["total_bytes"] == 0 and all(v["count"] == 0 for v in r["by_kind"].values())
    with pytest.raises(ValueError, match="ENTRY"):
        collective_bytes("not hlo")


# The forms the TPU compiler writes (tests/test_aot.py compiles real ones in the libtpu
# environment): an async all-gather split into a start fusion, a continuation fusion inside a
# loop and a done fusion, each holding a copy of the all-gather; a reduce-scatter as an
# 'all-reduce-scatter' fusion; a counted loop with no known_trip_count (counter initialised
# through a copy of constant 0, condition `counter < 3`) whose body all-reduces.
TPU_FORMS = """HloModule jit_step, is_scheduled=true

%ag (p0: bf16[4,8]) -> bf16[16,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,8]{1,0} all-gather(%p0), channel_id=1, dimensions={0}
}

%ag_cont (p0: bf16[4,8]) -> bf16[16,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,8]{1,0} all-gather(%p0), channel_id=1, dimensions={0}
}

%ag_done (p0: bf16[4,8]) -> bf16[16,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,8]{1,0} all-gather(%p0), channel_id=1, dimensions={0}
}

%all-reduce-scatter (p0: f32[16,8]) -> f32[4,8] {
  %p0 = f32[16,8]{1,0} parameter(0)
  %all-reduce.2 = f32[16,8]{1,0} all-reduce(%p0), channel_id=2, to_apply=%add
  ROOT %slice.1 = f32[4,8]{1,0} slice(%all-reduce.2), slice={[0:4], [0:8]}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[4,8], bf16[4,8])) -> pred[] {
  %limit = s32[]{:T(128)} constant(3)
  %p = (s32[], f32[4,8], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (p: (s32[], f32[4,8], bf16[4,8])) -> (s32[], f32[4,8], bf16[4,8]) {
  %p = (s32[], f32[4,8], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = bf16[4,8]{1,0} get-tuple-element(%p), index=2
  %cont = bf16[16,8]{1,0} fusion(%w), kind=kCustom, calls=%ag_cont, backend_config={"continuation_config":{"operand_original_start":"0"}}
  %r = f32[4,8]{1,0} all-reduce(%x), channel_id=3, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,8], bf16[4,8]) tuple(%next, %r, %w)
}

ENTRY %main (x: f32[4,8], w: bf16[4,8], g: f32[16,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = bf16[4,8]{1,0} parameter(1)
  %g = f32[16,8]{1,0} parameter(2)
  %async-collective-start = bf16[16,8]{1,0} fusion(%w), kind=kCustom, calls=%ag
  %zero = s32[] constant(0)
  %zero.copy = s32[] copy(%zero)
  %init = (s32[], f32[4,8], bf16[4,8]) tuple(%zero.copy, %x, %w)
  %loop = (s32[], f32[4,8], bf16[4,8]) while(%init), condition=%cond, body=%body
  %async-collective-done = bf16[16,8]{1,0} fusion(%async-collective-start), kind=kCustom, calls=%ag_done
  %fusion = f32[4,8]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_tpu_forms_async_collectives_reduce_scatter_fusion_and_counted_loops():
    r = collective_bytes(TPU_FORMS)
    assert r["by_kind"]["all-gather"] == {"count": 1, "bytes": 16 * 8 * 2}  # start only
    assert r["by_kind"]["reduce-scatter"] == {"count": 1, "bytes": 16 * 8 * 4}  # the whole operand
    assert r["by_kind"]["all-reduce"] == {"count": 3, "bytes": 3 * 4 * 8 * 4}  # 3 trips, inferred
    assert r["unknown_trip_count_loops"] == []
    # Without the counted-loop form (the limit is not a constant), the loop counts once.
    unknown = TPU_FORMS.replace("%limit = s32[]{:T(128)} constant(3)", "%limit = s32[] get-tuple-element(%p), index=0")
    r = collective_bytes(unknown)
    assert r["by_kind"]["all-reduce"]["count"] == 1 and r["unknown_trip_count_loops"] == ["loop"]
