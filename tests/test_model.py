"""MambaLM: shapes, initialisation facts, gradients, parameter counts, the Linen bridge."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from mamba_jax import MambaConfig, MambaLM

TINY = MambaConfig(d_model=16, n_layer=2, vocab_size=37, scan_impl="associative")


def ids(key, b, l, v=37):
    return jax.random.randint(jax.random.key(key), (b, l), 0, v)


def test_forward_shapes_and_padding():
    model = MambaLM(TINY, rngs=nnx.Rngs(0))
    assert TINY.padded_vocab_size == 40
    logits = model(ids(0, 3, 5))
    assert logits.shape == (3, 5, 40) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_official_initialisation():
    cfg = TINY
    model = MambaLM(cfg, rngs=nnx.Rngs(1))
    mixer = model.layers.mixer
    e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
    # A = -(1..n) for every channel (S4D-Real), D = 1.
    A = -np.exp(np.asarray(mixer.A_log[...]))
    np.testing.assert_allclose(
        A, -np.broadcast_to(np.arange(1, n + 1), (cfg.n_layer, e, n)), rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)
    # softplus(dt bias) lies in [dt_min, dt_max].
    dt = np.asarray(jax.nn.softplus(mixer.dt_proj.bias[...]))
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert np.abs(np.asarray(mixer.dt_proj.kernel[...])).max() <= r**-0.5
    # out_proj is U(+-1/sqrt(e)) rescaled by 1/sqrt(n_layer).
    bound = 1 / math.sqrt(e) / math.sqrt(cfg.n_layer)
    assert np.abs(np.asarray(mixer.out_proj.kernel[...])).max() <= bound
    emb = np.asarray(model.embedding.embedding[...])
    assert abs(emb.std() - 0.02) < 0.005
    for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias, model.norm_f.weight):
        assert p[...].dtype == jnp.float32


def test_bf16_compute_keeps_fp32_params():
    cfg = TINY.replace(dtype="bfloat16")
    model = MambaLM(cfg, rngs=nnx.Rngs(0))
    logits = model(ids(1, 2, 6))
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = MambaLM(TINY, rngs=nnx.Rngs(0))(ids(1, 2, 6))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_flow_to_every_param(remat):
    model = MambaLM(TINY.replace(remat=remat), rngs=nnx.Rngs(0))
    x = ids(2, 2, 9)

    def loss(m):
        logits = m(x[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1))

    grads = nnx.grad(loss)(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads)):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"zero gradient at {jax.tree_util.keystr(path)}"


def test_impls_agree_inside_the_model():
    x = ids(3, 2, 11)
    a = MambaLM(TINY.replace(scan_impl="associative"), rngs=nnx.Rngs(4))(x)
    r = MambaLM(TINY.replace(scan_impl="reference"), rngs=nnx.Rngs(4))(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_lti_ablation_builds_and_differs():
    cfg = TINY.replace(selective=False)
    model = MambaLM(cfg, rngs=nnx.Rngs(0))
    assert model(ids(4, 2, 7)).shape == (2, 7, 40)
    assert not hasattr(MambaLM(TINY, rngs=nnx.Rngs(0)).layers.mixer, "lti_dt")


@pytest.mark.parametrize("bad", [jnp.zeros((2, 3), jnp.float32), jnp.zeros((3,), jnp.int32)])
def test_bad_ids(bad):
    model = MambaLM(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids must be an integer array"):
        model(bad)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="d_model"):
        MambaConfig(d_model=0)
    with pytest.raises(ValueError, match="scan_impl"):
        MambaConfig(scan_impl="cuda")
    with pytest.raises(ValueError, match="dtype"):
        MambaConfig(dtype="float64")
    assert MambaConfig(d_model=768).dt_rank == 48 and MambaConfig(d_model=768).d_inner == 1536
    assert MambaConfig().padded_vocab_size == 50280


def test_linen_bridge():
    """MambaLM used from a Linen module through nnx.bridge."""

    class Wrapper(linen.Module):
        @linen.compact
        def __call__(self, x):
            lm = nnx.bridge.to_linen(MambaLM, TINY)
            return lm(x)

    x = ids(5, 2, 6)
    variables = Wrapper().init(jax.random.key(0), x)
    out = Wrapper().apply(variables, x)
    assert out.shape == (2, 6, 40)
    assert np.all(np.isfinite(np.asarray(out)))


# ----------------------------------------------------------------------------------------------
# Packed rows.

PACKED = MambaConfig(d_model=16, n_layer=2, vocab_size=40, d_conv=4, scan_impl="reference")


@pytest.mark.parametrize("impl", ["reference", "associative"])
def test_packed_row_equals_each_document_alone(impl, assert_close):
    """Documents of lengths 1, 5, 2, 9 and 1 in one row: the logits and the gradient of a loss
    on them equal those of each document run alone (the conv and the scan restart)."""
    from mamba_jax.model import with_config

    model = with_config(MambaLM(PACKED, rngs=nnx.Rngs(1)), scan_impl=impl)
    lengths = [1, 5, 2, 9, 1]
    ids = jax.random.randint(jax.random.key(2), (1, sum(lengths)), 0, 40)
    seg = jnp.concatenate([jnp.full((n,), k, jnp.int32) for k, n in enumerate(lengths)])[None]
    starts = np.cumsum([0] + lengths)

    def packed(m):
        return m(ids, segment_ids=seg)

    def alone(m):
        parts = [m(ids[:, s:t]) for s, t in zip(starts[:-1], starts[1:])]
        return jnp.concatenate(parts, axis=1)

    np.testing.assert_allclose(packed(model), alone(model), rtol=1e-5, atol=1e-5)
    # position_ids that restart at 0 mean the same segments.
    positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
    np.testing.assert_allclose(model(ids, position_ids=positions), packed(model), atol=1e-6)
    w = jax.random.normal(jax.random.key(3), (1, sum(lengths), PACKED.padded_vocab_size))
    g_packed = nnx.grad(lambda m: jnp.sum(packed(m) * w))(model)
    g_alone = nnx.grad(lambda m: jnp.sum(alone(m) * w))(model)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_alone)):
        assert_close(a, b, grad=True)


def test_packed_arguments_are_validated():
    model = MambaLM(PACKED, rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids must have the shape of input_ids"):
        model(ids, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="position_ids must be integers"):
        model(ids, position_ids=jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="not both"):
        model(ids, segment_ids=ids, position_ids=ids)
