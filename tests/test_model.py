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


def test_unrolled_layers_give_the_scanned_logits_and_constant_ids_work_under_jit():
    x = ids(5, 2, 9)
    scanned = MambaLM(TINY, rngs=nnx.Rngs(1))
    unrolled = MambaLM(TINY.replace(scan_layers=False), rngs=nnx.Rngs(1))
    want = scanned(x)
    np.testing.assert_allclose(np.asarray(unrolled(x)), np.asarray(want), rtol=1e-5, atol=1e-6)
    # The ids are a constant of the traced function: their range is still checked, on the host
    # (under jax.make_jaxpr, reading their min() through jnp would raise).
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m: m(x))(scanned)), np.asarray(want),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    bad = x + TINY.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nnx.jit(lambda m: m(bad))(scanned)


def test_unrolled_layers_lower_each_pallas_kernel_once(monkeypatch):
    """Unrolled layers call one jitted kernel function: the train step's StableHLO (lowered for
    CUDA on this CPU machine) holds as many Mosaic GPU kernels for 3 layers as for 1. Traced
    inline, each layer lowered its own copies (the 130m step had 96 kernels, 49 MB of text)."""
    import pallas_kernels as pk

    monkeypatch.setattr(pk, "unsupported_reason", lambda **kw: None)  # lowering needs no device
    x = ids(6, 2, 24)

    def kernels(n_layer):
        config = TINY.replace(n_layer=n_layer, scan_impl="pallas", scan_layers=False, remat=True)
        graphdef, params = nnx.split(MambaLM(config, rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32) ** 2)
        text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
        return text.count("@mosaic_gpu_v2(")

    one = kernels(1)
    assert one >= 2  # a forward and a backward kernel at least
    assert kernels(3) == one


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
    with pytest.raises(ValueError, match="remat_keep_scan_layers"):
        MambaConfig(n_layer=4, remat_keep_scan_layers=5, scan_layers=False)
    with pytest.raises(ValueError, match="needs scan_layers=False"):
        MambaConfig(n_layer=4, remat_keep_scan_layers=2)
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


# The model's segment and padding plumbing is the same for every scan; each scan's own handling
# of segment ids is tested against running each segment alone in test_scan.py.
@pytest.mark.parametrize("impl", ["associative"])
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


# ----------------------------------------------------------------------------------------------
# Padded rows and states carried across windows.


@pytest.mark.parametrize("impl", ["associative"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_each_row_alone(impl, side, assert_close):
    """Rows of lengths 7, 1, 4 and 0 padded to 9: every real token's logits, the gradient of a
    loss on them, and (right padding, with a cache carried in) the cache after the row equal
    those of the row run alone."""
    from mamba_jax.model import MambaCache, with_config

    model = with_config(MambaLM(PACKED, rngs=nnx.Rngs(4)), scan_impl=impl)
    lengths, total = [7, 1, 4, 0], 9
    tokens = jax.random.randint(jax.random.key(5), (len(lengths), total), 0, 40)
    mask = np.zeros((len(lengths), total), bool)
    for r, n in enumerate(lengths):
        if side == "right":
            mask[r, :n] = True
        else:
            mask[r, total - n :] = True
    mask = jnp.asarray(mask)
    seg = jnp.asarray(np.repeat([[0, 0, 0, 1, 1, 1, 1, 2, 2]], len(lengths), axis=0))
    w = jax.random.normal(jax.random.key(6), (len(lengths), total, PACKED.padded_vocab_size))

    def real(r):  # the real positions of row r
        return slice(0, lengths[r]) if side == "right" else slice(total - lengths[r], total)

    def padded_loss(m):
        logits = m(tokens, segment_ids=seg, padding_mask=mask)
        return jnp.sum(jnp.where(mask[..., None], logits * w, 0.0)), logits

    def alone_loss(m):
        out, parts = 0.0, []
        for r, n in enumerate(lengths):
            if n:
                logits = m(tokens[r : r + 1, real(r)], segment_ids=seg[r : r + 1, real(r)])
                out = out + jnp.sum(logits * w[r : r + 1, real(r)])
                parts.append(logits)
        return out, parts

    (_, logits), g_pad = nnx.value_and_grad(padded_loss, has_aux=True)(model)
    (_, parts), g_alone = nnx.value_and_grad(alone_loss, has_aux=True)(model)
    rows = [r for r, n in enumerate(lengths) if n]
    for r, part in zip(rows, parts, strict=True):
        np.testing.assert_allclose(logits[r : r + 1, real(r)], part, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_alone), strict=True):
        assert_close(a, b, grad=True)

    if side == "right":
        k1, k2 = jax.random.split(jax.random.key(7))
        start = MambaCache(
            jax.random.normal(k1, model.init_cache(len(lengths)).conv.shape),
            jax.random.normal(k2, model.init_cache(len(lengths)).ssm.shape),
        )
        _, after = model(tokens, start, segment_ids=seg, padding_mask=mask)
        for r, n in enumerate(lengths):
            one = MambaCache(start.conv[:, r : r + 1], start.ssm[:, r : r + 1])
            if n:
                _, one = model(tokens[r : r + 1, :n], one, segment_ids=seg[r : r + 1, :n])
            np.testing.assert_allclose(after.conv[:, r : r + 1], one.conv, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(after.ssm[:, r : r + 1], one.ssm, rtol=1e-5, atol=1e-5)


def test_padding_mask_is_validated():
    model = MambaLM(PACKED, rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"padding_mask must have the shape of input_ids"):
        model(ids, padding_mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        model(ids, padding_mask=jnp.ones((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="padding between real tokens"):
        model(ids, padding_mask=jnp.asarray([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="only 0/1"):
        model(ids, padding_mask=jnp.asarray([[1, 2, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="left-padded, but with a cache"):
        model(ids, model.init_cache(2), padding_mask=jnp.asarray([[0, 1, 1, 1, 1]] * 2))
    with pytest.raises(ValueError, match=r"cache.ssm must have shape"):
        cache = model.init_cache(2)
        model(ids, cache._replace(ssm=cache.ssm[:, :1]))


@pytest.mark.parametrize("remat", [False, True])
def test_windows_with_carried_state_equal_one_long_forward(remat, assert_close):
    """One stream of 23 tokens with documents starting at 0, 6, 8 (a window start), 13 and 15
    (inside the last d_conv - 1 positions of a window), cut into windows of 8 (the last one
    short): carrying each window's final cache into the next gives the long forward's hidden
    states, and the cache after the stream."""
    from mamba_jax.model import with_config

    model = with_config(MambaLM(PACKED, rngs=nnx.Rngs(8)), remat=remat)
    stream = jax.random.randint(jax.random.key(9), (2, 23), 0, 40)
    seg = np.zeros((2, 23), np.int32)
    for start in (6, 8, 13, 15):
        seg[0, start:] += 1
    seg = jnp.asarray(seg)
    whole, cache_whole = model.hidden_states(stream, model.init_cache(2), segment_ids=seg)
    cache, parts = model.init_cache(2), []
    for s in range(0, 23, 8):
        if s:  # a document that starts with the window does not see the carried state
            keep = (seg[:, s] == seg[:, s - 1]).astype(jnp.float32)
            cache = cache._replace(
                conv=cache.conv * keep[None, :, None, None],
                ssm=cache.ssm * keep[None, :, None, None],
            )
        h, cache = model.hidden_states(stream[:, s : s + 8], cache, segment_ids=seg[:, s : s + 8])
        parts.append(h)
    assert_close(jnp.concatenate(parts, axis=1), whole)
    assert_close(cache.conv, cache_whole.conv)
    assert_close(cache.ssm, cache_whole.ssm)
