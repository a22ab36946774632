"""The C++ kernels of peer_jax.native against plain numpy, and their build/cache/error handling.

Layer-level equality (PEER and PKM with compute='native' == 'naive', values and gradients,
single device and on 8 fake devices) lives in test_peer.py, test_pkm.py and test_table_lookup.py.
"""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peer_jax import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler: compute='native' unavailable")


def _case(seed, m=37, s=5, n=64, d=33):
    """Odd d (SIMD tails), many duplicate rows, and rows no pair is routed to."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(np.float32)
    table = rng.standard_normal((n, d)).astype(np.float32)
    idx = rng.integers(0, n // 2, (m, s)).astype(np.int32)  # upper half of the table unused
    idx[0, :] = 3  # one row picked by every slot of a token
    w = rng.standard_normal((m, s)).astype(np.float32)
    return x, table, idx, w


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("grouped", [True, False])
def test_kernels_match_numpy(seed, grouped):
    """grouped: the expert-centric kernels (pairs grouped by row); otherwise embedding_bag and
    scatter_outer take their token-centric small-table kernels (this table is 8 KiB)."""
    x, table, idx, w = _case(seed)
    n, d = table.shape
    assert native.small_table(n, d)
    dot = np.einsum("md,msd->ms", x.astype(np.float64), table[idx].astype(np.float64))
    bag = np.einsum("ms,msd->md", w.astype(np.float64), table[idx].astype(np.float64))
    scat = np.zeros((n, d))
    np.add.at(scat, idx.reshape(-1), (w[:, :, None].astype(np.float64) * x[:, None, :]).reshape(-1, d))

    def kernels(x, t, i, w):
        g = native.group_by_row(i, n) if grouped else None
        return native.gather_dot(x, t, i), native.embedding_bag(t, i, w, g), native.scatter_outer(i, w, x, n, g)

    got = jax.jit(kernels)(x, table, idx, w)
    for g, want in zip(got, (dot, bag, scat)):
        assert g.dtype == jnp.float32 and g.shape == want.shape
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[2])[n // 2:].any()  # rows nobody was routed to: exactly zero


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,s,d", [(37, 5, 33), (1, 16, 1280), (3, 7, 200)])
def test_decode_kernels_match_numpy(dtype, m, s, d):
    """The token-centric decode kernels on float32 and bfloat16 tables (widened per element in the
    kernel) against float64 numpy on the same stored values: duplicate rows (token 0 reads one row
    in every slot), odd d (SIMD tails), one token whose columns are split over the threads."""
    x, table, idx, w = _case(5, m=m, s=s, d=d)
    table = jnp.asarray(table, dtype)
    rows = np.asarray(table.astype(jnp.float32)).astype(np.float64)[idx]
    dot = np.einsum("md,msd->ms", x.astype(np.float64), rows)
    bag = np.einsum("ms,msd->md", w.astype(np.float64), rows)
    got = jax.jit(lambda x, t, i, w: (native.decode_gather_dot(x, t, i), native.decode_bag(t, i, w)))(x, table, idx, w)
    for g, want in zip(got, (dot, bag)):
        assert g.dtype == jnp.float32 and g.shape == want.shape
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)


def test_kernels_are_deterministic():
    x, table, idx, w = _case(2, m=300, s=16, n=4096, d=64)
    f = jax.jit(lambda x, t, i, w: (native.gather_dot(x, t, i), native.embedding_bag(t, i, w),
                                    native.scatter_outer(i, w, x, t.shape[0]),
                                    native.embedding_bag(t, i, w, native.group_by_row(i, t.shape[0])),
                                    native.scatter_outer(i, w, x, t.shape[0], native.group_by_row(i, t.shape[0])),
                                    native.decode_gather_dot(x, t, i), native.decode_bag(t, i, w)))
    a, b = f(x, table, idx, w), f(x, table, idx, w)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_library_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("PEER_JAX_CACHE", str(tmp_path))
    path = native.library_path()
    assert path.parent == tmp_path / "native" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert native.library_path() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries left behind


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PEER_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(native.NativeUnavailable, match="no-such-compiler-xyz.*compute='efficient'"):
        native.library_path()


def test_failed_build_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PEER_JAX_CACHE", str(tmp_path))
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(native.NativeUnavailable, match="building the native kernels failed"):
        native.library_path()
    assert not list((tmp_path / "native").iterdir())  # the failed output was removed


def test_out_of_range_index_is_an_error_not_a_wild_write():
    x, table, idx, w = _case(3)
    bad = idx.copy()
    bad[1, 2] = table.shape[0]  # one past the end
    n = table.shape[0]
    for fn in (lambda: native.gather_dot(x, table, bad), lambda: native.embedding_bag(table, bad, w),
               lambda: native.scatter_outer(bad, w, x, n),  # small-table kernels: checked in the kernel
               lambda: native.scatter_outer(bad, w, x, n, native.group_by_row(bad, n)),
               lambda: native.decode_gather_dot(x, table, bad), lambda: native.decode_bag(table, bad, w)):
        with pytest.raises(Exception, match="index out of range"):
            jax.block_until_ready(jax.jit(fn)())


@pytest.mark.parametrize("n,k", [(16, 16), (17, 16), (50, 16), (64, 5), (256, 16), (32, 1), (300, 9), (64, 32),
                                 (300, 24), (100, 40)])
@pytest.mark.parametrize("scores", ["normal", "ties", "neg_inf"])
def test_product_key_select_matches_lax_top_k(n, k, scores):
    """The C++ selection (half top-k's with the block-maximum bound, candidates, final top-k)
    against the same steps in lax.top_k: identical values and items, tie order included. k <= 16
    and k <= 32 take the two- and four-vector insertions, k = 40 the scalar one; rows whose
    bound is -inf (half the entries -inf, some rows all -inf) take the scalar one too."""
    from peer_jax.layers.product_keys import candidate_pairs

    rng = np.random.default_rng(n * 10 + k)
    shape = (40, n)
    if scores == "ties":
        s1, s2 = (rng.integers(0, 3, shape).astype(np.float32) for _ in range(2))
    else:
        s1, s2 = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    if scores == "neg_inf":
        for s in (s1, s2):
            s[rng.random(shape) < 0.5] = -np.inf
            s[:3] = -np.inf

    def reference(s1, s2):
        v1, i1 = jax.lax.top_k(s1, k)
        v2, i2 = jax.lax.top_k(s2, k)
        ci, cj = candidate_pairs(k)
        cand = (v1[:, :, None] + v2[:, None, :]).reshape(-1, k * k)[:, ci * k + cj]
        sc, j = jax.lax.top_k(cand, k)
        a = jnp.take_along_axis(i1, jnp.asarray(ci)[j], -1)
        b = jnp.take_along_axis(i2, jnp.asarray(cj)[j], -1)
        return sc, a * n + b

    got, want = jax.jit(lambda a, b: (native.product_key_select(a, b, k), reference(a, b)))(s1, s2)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_native_off_cpu_is_a_start_up_config_error(monkeypatch):
    """On an accelerator backend, PEER(compute='native') fails at construction with a ValueError
    (the CLIs turn it into one line and exit 2) that names the fix."""
    from flax import nnx

    from peer_jax.layers.peer import PEER

    monkeypatch.setattr(native.jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="compute='native' runs on CPU only.*compute='efficient'"):
        PEER(16, rngs=nnx.Rngs(0), num_experts=64, heads=2, top_k=2, d_key=8, compute="native")


def test_row_grouping_is_computed_once_per_custom_vjp_call():
    """expert_dot's forward and both backward kernels share one group_by_row (not three sorts)."""
    from peer_jax import backends

    x, table, idx, w = _case(4)
    ops = backends.ops("native")

    def loss(x, table):
        return jnp.sum(ops.gather_dot(x, table, idx, dtype=jnp.float32, block=1) * w)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, table))
    assert jaxpr.count("peer_jax_group_by_row") == 1, jaxpr
    assert jaxpr.count("peer_jax_gather_dot") == 1 and jaxpr.count("peer_jax_scatter_outer") == 1


@pytest.mark.skipif(platform.machine() != "x86_64", reason="baseline x86-64 build")
def test_kernels_built_for_baseline_x86_64_pass_the_same_tests(tmp_path):
    """The kernels compiled without AVX/AVX2 (-march=x86-64: SSE2 code for the vector types, the
    scalar candidate collection, no non-temporal stores) pass this file's kernel and selection
    tests, run in a fresh process so that build is the one registered."""
    env = dict(os.environ, PEER_JAX_NATIVE_MARCH="x86-64", PEER_JAX_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "select or match_numpy or deterministic or out_of_range"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]
    built = list((tmp_path / "native").glob("peer_kernels-*.so"))
    assert len(built) == 1, built  # the baseline build, not the cached -march=native one
