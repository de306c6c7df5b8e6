"""inspection: discretisation, per-layer scan inputs, work/depth counts, scan cost measurement."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from inspection import (
    associative_scan_work_depth,
    discretize,
    fit_task,
    mean_by_kind,
    measure_scan,
    scan_agreement,
    scan_work_depth,
    selectivity,
    ssm_intermediates,
    token_kinds,
)

from mamba_jax import MambaConfig, MambaLM, selective_scan
from mamba_jax.training.tasks import SelectiveCopying


def _rand(key, shape, scale=1.0, shift=0.0):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale + shift


def test_zoh_matches_the_integral_and_euler_is_delta_b():
    e, n = 5, 3
    delta = jax.nn.softplus(_rand(0, (2, e)))  # (2, e)
    A = -jnp.exp(_rand(1, (e, n)))  # (e, n)
    B = _rand(2, (2, n))
    A_bar, B_zoh = discretize(delta, A, B, "zoh")
    _, B_euler = discretize(delta, A, B, "euler")
    d, a, b = (np.asarray(x, np.float64) for x in (delta, A, B))
    np.testing.assert_allclose(A_bar, np.exp(d[..., None] * a), rtol=1e-6)
    # B_bar = (integral_0^delta exp(A s) ds) B, by the trapezoid rule on a fine grid.
    s = np.linspace(0.0, 1.0, 20001)[:, None, None, None] * d[None, ..., None]  # (k, 2, e, 1)
    integral = np.trapezoid(np.exp(a * s), s, axis=0)  # (2, e, n)
    np.testing.assert_allclose(B_zoh, integral * b[:, None, :], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(B_euler, d[..., None] * b[:, None, :], rtol=1e-6)


def test_zoh_tends_to_euler_for_small_steps_and_handles_a_zero():
    A = jnp.array([[-1.0, -4.0, 0.0]])  # (1, 3): a zero A must not divide by zero
    B = jnp.ones((1, 3))
    for step in (1e-1, 1e-3):
        _, zoh = discretize(jnp.full((1, 1), step), A, B, "zoh")
        _, euler = discretize(jnp.full((1, 1), step), A, B, "euler")
        rel = np.abs(np.asarray(zoh - euler)) / step
        # The two agree to first order: the gap is about |A| step / 2 relative.
        assert np.all(rel <= 4.0 * step / 2 * 1.01), rel
        assert np.all(np.isfinite(np.asarray(zoh)))
    np.testing.assert_allclose(zoh[0, 0, 2], 1e-3, rtol=1e-6)


def test_euler_discretisation_reproduces_the_scan(assert_close):
    b, l, e, n = 2, 9, 6, 4
    u = _rand(0, (b, l, e))
    delta = jax.nn.softplus(_rand(1, (b, l, e)))
    A = -jnp.exp(_rand(2, (e, n)))
    B, C = _rand(3, (b, l, n)), _rand(4, (b, l, n))
    A_bar, B_bar = discretize(delta, A, B, "euler")  # (b, l, e, n)
    h = jnp.zeros((b, e, n))
    ys = []
    for t in range(l):
        h = A_bar[:, t] * h + B_bar[:, t] * u[:, t, :, None]
        ys.append(jnp.einsum("ben,bn->be", h, C[:, t]))
    y = selective_scan(u, delta, A, B, C, impl="reference")
    assert_close(jnp.stack(ys, axis=1), y)


def test_discretize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        discretize(jnp.ones((2, 3)), -jnp.ones((3, 4)), jnp.ones((2, 4)), "bilinear")
    with pytest.raises(ValueError, match="A must have shape"):
        discretize(jnp.ones((2, 3)), -jnp.ones((5, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="B must have shape"):
        discretize(jnp.ones((2, 3)), -jnp.ones((3, 4)), jnp.ones((2, 5)))


@pytest.mark.parametrize("selective", [True, False])
def test_intermediates_rebuild_every_block(selective, assert_close):
    cfg = MambaConfig(
        d_model=16, n_layer=3, vocab_size=29, scan_impl="reference", selective=selective
    )
    model = MambaLM(cfg, rngs=nnx.Rngs(3))
    ids = jax.random.randint(jax.random.key(5), (2, 11), 0, cfg.vocab_size)
    got = ssm_intermediates(model, ids)
    L, e, n = cfg.n_layer, cfg.d_inner, cfg.d_state
    assert got.hidden.shape == (L + 1, 2, 11, cfg.d_model)
    assert got.u.shape == got.delta.shape == got.dt.shape == got.z.shape == (L, 2, 11, e)
    assert got.B.shape == got.C.shape == (L, 2, 11, n)
    mixer = model.layers.mixer
    A_log, D = mixer.A_log[...], mixer.D[...]
    bias, out_kernel = mixer.dt_proj.bias[...], mixer.out_proj.kernel[...]
    for i in range(L):
        assert_close(got.dt[i], jax.nn.softplus(got.delta[i] + bias[i]))
        # Layer i's output is its input plus out_proj of the scan run on the captured inputs.
        y = selective_scan(
            got.u[i],
            got.delta[i],
            -jnp.exp(A_log[i]),
            got.B[i],
            got.C[i],
            D[i],
            got.z[i],
            bias[i],
            delta_softplus=True,
            impl="reference",
        )
        assert_close(got.hidden[i + 1], got.hidden[i] + y @ out_kernel[i])
    assert_close(got.hidden[0], model.embedding(ids))
    if not selective:
        # The LTI ablation: one Δ, B and C for every position and sequence.
        for x in (got.delta, got.B, got.C):
            np.testing.assert_array_equal(x, jnp.broadcast_to(x[:, :1, :1], x.shape))
    else:
        assert float(jnp.std(got.delta[0], axis=1).mean()) > 0


def test_intermediates_reject_float_ids():
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=29), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids"):
        ssm_intermediates(model, jnp.zeros((1, 4), jnp.float32))


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_associative_scan_is_log_depth_and_linear_work(k):
    length = 2**k
    got = associative_scan_work_depth(length)
    # The odd-even recursion halves the sequence per level, twice per level (down and up).
    assert got["depth"] == 2 * k - 1
    assert got["work"] == 2 * length - k - 2


def test_scan_work_depth_chunked_is_sequential_across_chunks():
    got = scan_work_depth(1000, chunk=128)
    inner = associative_scan_work_depth(128)
    assert got["sequential"] == {"work": 1000, "depth": 1000}
    assert got["chunked"]["depth"] == 8 * (inner["depth"] + 1)
    assert got["associative"]["depth"] <= 2 * math.ceil(math.log2(1000))
    with pytest.raises(ValueError, match="chunk"):
        scan_work_depth(10, chunk=0)
    with pytest.raises(ValueError, match="length"):
        associative_scan_work_depth(0)


def test_measure_scan_memory_of_the_backward():
    short = {i: measure_scan(i, 256, e=16, grad=True, reps=1) for i in ("reference", "associative")}
    long = {i: measure_scan(i, 2048, e=16, grad=True, reps=1) for i in ("reference", "associative")}
    for r in (*short.values(), *long.values()):
        assert r["ms"] > 0 and r["temp_bytes"] > 0 and r["argument_bytes"] > 0
    # The reference's autodiff keeps every step's state: 8x the length, about 8x the memory.
    assert long["reference"]["temp_bytes"] > 6 * short["reference"]["temp_bytes"]
    # The chunked associative backward keeps only chunk-boundary states and one chunk's work.
    assert long["associative"]["temp_bytes"] < 3 * short["associative"]["temp_bytes"]
    with pytest.raises(ValueError, match="impl"):
        measure_scan("auto", 16)


def test_fit_task_trains_in_place_and_logs():
    task = SelectiveCopying(seq_len=8, vocab_size=5, n_data=2)
    cfg = MambaConfig(d_model=8, n_layer=1, vocab_size=5, scan_impl="reference")
    model = MambaLM(cfg, rngs=nnx.Rngs(0))
    before = np.asarray(model.layers.mixer.x_proj.kernel[...]).copy()
    history = fit_task(model, task, steps=4, batch_size=4, lr=1e-2, log_every=2)
    assert [h["step"] for h in history] == [2, 4]
    assert all(np.isfinite(h["loss"]) and 0 <= h["accuracy"] <= 1 for h in history)
    assert not np.allclose(before, np.asarray(model.layers.mixer.x_proj.kernel[...]))
    with pytest.raises(ValueError, match="steps"):
        fit_task(model, task, steps=0, batch_size=4)


def test_scan_agreement_runs_every_implementation_against_the_reference():
    b, l, e, n = 1, 12, 8, 4
    ks = jax.random.split(jax.random.key(0), 5)
    u, delta, z = (jax.random.normal(k, (b, l, e)) for k in ks[:3])
    A = -jnp.exp(_rand(3, (e, n)))
    B, C = _rand(4, (b, l, n)), _rand(5, (b, l, n))
    got = scan_agreement(u, delta, A, B, C, z=z, impls=("associative", "pallas"))
    for impl in ("associative", "pallas"):
        r = got[impl]
        assert impl in r["how"] and "skipped" not in r
        assert r["ref_max_abs_y"] > 0.1
        assert r["max_abs_y"] < 1e-4 * r["ref_max_abs_y"] and r["max_abs_h"] < 1e-4
    assert "interpret=True" in got["pallas"]["how"]  # the CPU runs the kernel interpreted
    # A kernel that refuses the call (d_state above its limit) is reported, not raised.
    import pallas_kernels

    big = pallas_kernels.MAX_D_STATE + 1
    A2, B2 = -jnp.ones((e, big)), jnp.ones((b, l, big))
    refused = scan_agreement(u, delta, A2, B2, B2, impls=("pallas",))["pallas"]
    assert "d_state" in refused["skipped"]
    with pytest.raises(ValueError, match="impls"):
        scan_agreement(u, delta, A, B, C, impls=("auto",))


def test_token_kinds_and_grouped_means():
    task = SelectiveCopying(seq_len=10, vocab_size=6, n_data=3)
    inputs = np.stack([task.example(seed=0, index=i)["inputs"] for i in range(4)])  # (4, 10)
    kinds = token_kinds(task, inputs)
    assert kinds.shape == (4, 10)
    assert (kinds == "marker").sum(axis=1).tolist() == [3] * 4  # the last n_data positions
    assert (kinds == "data").sum(axis=1).tolist() == [3] * 4
    assert np.all(inputs[kinds == "noise"] == 0)
    # Per channel: channel 0 is 3 on data and 1 elsewhere, channel 1 is 2 everywhere.
    values = np.stack([np.where(kinds == "data", 3.0, 1.0), np.full((4, 10), 2.0)], axis=-1)
    means = mean_by_kind(values, kinds)
    assert set(means) == {"noise", "data", "marker"}
    np.testing.assert_allclose(means["data"], [3.0, 2.0])
    np.testing.assert_allclose(means["noise"], [1.0, 2.0])
    np.testing.assert_allclose(selectivity(values, kinds), [3.0, 1.0])
    with pytest.raises(ValueError, match="kinds must have shape"):
        mean_by_kind(values[:, :5], kinds)
    with pytest.raises(ValueError, match="'gap'"):
        selectivity(values, kinds, on="gap")
    with pytest.raises(ValueError, match="inputs"):
        token_kinds(task, inputs.astype(np.float32))
