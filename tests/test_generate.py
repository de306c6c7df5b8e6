"""Decoding: prefill + steps equal the full forward, and generate() equals a greedy argmax loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLM, generate
from mamba_jax.sampling import _decode_jit, decode, prefill, sample_logits

CFG = MambaConfig(d_model=16, n_layer=2, vocab_size=29, scan_impl="associative")


@pytest.fixture(scope="module")
def model():
    return MambaLM(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prefill", [1, 2, 7])
def test_prefill_then_steps_equals_full_forward(model, prefill):
    k = 4
    x = jax.random.randint(jax.random.key(prefill), (3, prefill + k), 0, 29)
    full = model(x)
    logits, cache = model(x[:, :prefill], cache=model.init_cache(3))
    outs = [logits]
    for t in range(prefill, prefill + k):
        step_logits, cache = model.step(x[:, t], cache)
        outs.append(step_logits[:, None])
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert cache.conv.shape == (2, 3, 3, 32) and cache.ssm.shape == (2, 3, 32, 16)


def test_two_prefills_equal_one(model):
    x = jax.random.randint(jax.random.key(9), (2, 9), 0, 29)
    full = model(x)
    l1, cache = model(x[:, :4], cache=model.init_cache(2))
    l2, cache = model(x[:, 4:], cache=cache)
    np.testing.assert_allclose(np.concatenate([l1, l2], 1), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_last_only_equals_the_last_position(model):
    x = jax.random.randint(jax.random.key(11), (2, 6), 0, 29)
    full = model(x)
    last = model(x, last_only=True)
    cached_full, cache_a = model(x, cache=model.init_cache(2))
    cached_last, cache_b = model(x, cache=model.init_cache(2), last_only=True)
    assert last.shape == (2, 1, CFG.padded_vocab_size)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(full[:, -1:]))
    np.testing.assert_array_equal(np.asarray(cached_last), np.asarray(cached_full[:, -1:]))
    np.testing.assert_array_equal(np.asarray(cache_a.ssm), np.asarray(cache_b.ssm))


@jax.jit
def _teacher_forced(decoder, caches, tokens):
    """Decoder.step over given tokens (k, b) in one lax.scan -> logits (k, b, v)."""

    def body(caches, token):
        logits, caches = decoder.step(token, caches)
        return caches, logits

    return jax.lax.scan(body, caches, tokens)[1]


@pytest.mark.parametrize("prompt, batch", [(1, 3), (6, 1)])
def test_prefill_and_decoder_loop_equal_full_forward(model, prompt, batch):
    """generate's own pieces: the prefill program and Decoder.step in a jitted loop (weights cast
    and unstacked once, per-layer caches; at batch 1 the matrix-vector layout) give the full
    forward's logits."""
    k = 5
    x = jax.random.randint(jax.random.key(prompt), (batch, prompt + k), 0, 29)
    full = np.asarray(model(x))  # (b, l, v)
    first, decoder, caches = prefill(model, x[:, :prompt], jax.random.key(0))
    assert len(caches) == CFG.n_layer and caches[0][1].shape == (batch, 32, 16)
    assert decoder.matvec == (batch == 1)
    np.testing.assert_array_equal(
        np.asarray(first), full[:, prompt - 1, : CFG.vocab_size].argmax(-1)
    )
    logits = _teacher_forced(decoder, caches, x[:, prompt:].T)  # (k, b, v)
    np.testing.assert_allclose(
        np.asarray(logits).transpose(1, 0, 2), full[:, prompt:], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("param_dtype, batch", [("float32", 2), ("bfloat16", 1)])
def test_decoder_casts_once_and_matches_the_bf16_forward(param_dtype, batch, assert_close):
    cfg = CFG.replace(dtype="bfloat16", param_dtype=param_dtype)
    model = MambaLM(cfg, rngs=nnx.Rngs(1))
    decoder = model.decoder()
    mixer = decoder.blocks[0]["mixer"]
    assert decoder.embedding.dtype == jnp.bfloat16
    for w in (mixer["in_proj"]["kernel"], mixer["conv1d"]["bias"], mixer["dt_proj"]["kernel"]):
        assert w.get_value().dtype == jnp.bfloat16
    for w in (mixer["D"], mixer["dt_proj"]["bias"], decoder.blocks[0]["norm"]["weight"]):
        assert w.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(decoder.A[1]), np.asarray(model.layers.mixer.A()[1]))
    matvec = model.decoder(batch_size=1)
    assert matvec.matvec and matvec.blocks[0]["in_proj"].shape == (64, 16)  # (2e, d): transposed
    assert matvec.blocks[0]["in_proj"].dtype == jnp.bfloat16
    x = jax.random.randint(jax.random.key(5), (batch, 7), 0, 29)
    full = model(x)
    _, decoder, caches = prefill(model, x[:, :4], jax.random.key(0))
    logits = _teacher_forced(decoder, caches, x[:, 4:].T)
    assert_close(jnp.asarray(logits).transpose(1, 0, 2), full[:, 4:], jnp.bfloat16)


def test_decode_program_is_one_loop_with_the_layers_unrolled(model):
    """The token loop is the program's only loop: its body holds every layer as straight-line
    code (a loop over layers inside would break the body into many small launches)."""
    first, decoder, caches = prefill(model, jnp.zeros((2, 3), jnp.int32), jax.random.key(0))
    text = _decode_jit.lower(
        decoder,
        first,
        caches,
        jax.random.key(1),
        jnp.float32(1),
        jnp.float32(1),
        steps=4,
        greedy=True,
        top_k=None,
        nucleus=False,
        vocab_size=29,
    ).as_text()
    assert text.count("stablehlo.while") == 1
    tokens, _ = decode(decoder, first, caches, 4, jax.random.key(1))
    assert tokens.shape == (2, 4) and tokens.dtype == jnp.int32


def test_greedy_generate_matches_argmax_loop(model):
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 29)
    out = generate(model, prompt, 6)
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    seq = prompt
    for _ in range(6):
        nxt = jnp.argmax(model(seq)[:, -1, : CFG.vocab_size], axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))


def test_sampling_is_seeded_and_stays_in_vocab(model):
    prompt = jax.random.randint(jax.random.key(2), (4, 3), 0, 29)
    a = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7))
    b = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7))
    c = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert int(a.max()) < CFG.vocab_size
    # top_k=1 is greedy whatever the temperature.
    g = generate(model, prompt, 8)
    k1 = generate(model, prompt, 8, temperature=2.0, top_k=1, rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(k1))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    top_k = sample_logits(logits, keys, temperature=1.0, top_k=2)
    assert set(np.unique(np.asarray(top_k))) == {0, 1}
    top_p = sample_logits(logits, keys, temperature=1.0, top_p=0.7)
    assert set(np.unique(np.asarray(top_p))) == {0, 1}  # 0.5 < 0.7 needs the second token
    top_p = sample_logits(logits, keys, temperature=1.0, top_p=0.4)
    assert set(np.unique(np.asarray(top_p))) == {0}


@pytest.mark.parametrize("top_k, top_p", [(None, 0.8), (7, 0.5)])
def test_top_k_top_p_keep_the_expected_tokens_of_random_logits(top_k, top_p):
    """On random logits (no ties): the support sampled is the set a sort-based reference keeps,
    top_k first, then the smallest prefix of the rest (renormalised) with mass >= top_p."""
    logits = jax.random.normal(jax.random.key(top_k or 0), (1, 23)) * 2.0
    ref = np.asarray(logits[0], np.float64)
    order = np.argsort(-ref)[: top_k or ref.size]
    p = np.exp(ref[order] - ref[order].max())
    p /= p.sum()
    expected = set(order[: int(np.sum(np.cumsum(p) - p < top_p))].tolist())
    draws = jax.vmap(
        lambda k: sample_logits(logits, k, temperature=1.0, top_k=top_k, top_p=top_p)[0]
    )(jax.random.split(jax.random.key(1), 4000))
    assert set(np.unique(np.asarray(draws)).tolist()) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=jnp.zeros((3,), jnp.int32)), "input_ids must have shape"),
        (dict(input_ids=jnp.zeros((1, 2), jnp.float32)), "input_ids must be integers"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_generate_rejects_bad_arguments(model, kwargs, match):
    args = dict(input_ids=jnp.zeros((1, 2), jnp.int32), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)
