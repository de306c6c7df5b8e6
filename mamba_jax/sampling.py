"""Sampling from a MambaLM: a prefill program and a decode program, no host round trip per token.

Decoding is the recurrent mode of the SSM (paper section 3.4): each new token costs O(1) time and
memory, because the state (b, e, n) and the conv window (b, w - 1, e) summarise the whole prefix.

`generate` runs two jitted programs. `prefill` runs the whole prompt through the model's
parallel (scan) mode, samples the first new token from the last position's logits, and lays the
weights out for decoding once (`MambaLM.decoder()`: cast, one buffer per layer, A precomputed,
and at batch 1 the matrices transposed for matrix-vector products).
`decode` is one `lax.scan` over the remaining tokens whose body is `Decoder.step`: the layers as
straight-line code over per-layer caches that the loop updates in place (the caches are donated),
so XLA compiles each token to one body of a few kernels per layer, with no inner loop over
layers and no per-token copies of weights or caches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits, rng, *, temperature, top_k=None, top_p=None, vocab_size=None):
    """logits: (b, v) float32 -> token ids (b,) int32.

    temperature 0 means greedy. Padded vocab entries (>= vocab_size) are never sampled. top_k
    keeps the k largest logits, top_p the smallest set of largest logits whose probability mass
    reaches top_p (the largest one always); both keep every token tied with the last one kept.
    """
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        valid = jnp.arange(logits.shape[-1]) < vocab_size
        logits = jnp.where(valid, logits, -jnp.inf)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    ranked = None  # (b, k) the largest logits, in decreasing order
    if top_k is not None:
        ranked = jax.lax.top_k(logits, top_k)[0]  # (b, k)
        logits = jnp.where(logits < ranked[:, -1:], -jnp.inf, logits)
    if top_p is not None:
        if ranked is None:
            ranked = -jnp.sort(-logits, axis=-1)  # (b, v); values only, no argsort and scatter
        probs = jax.nn.softmax(ranked, axis=-1)  # over the top_k when given, as the mask says
        # The kept prefix is where the mass before a token is below top_p: at least one token.
        n_keep = jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < top_p, -1, keepdims=True)  # (b, 1)
        cutoff = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)  # (b, 1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


_SAMPLING = ("greedy", "top_k", "nucleus", "vocab_size")


def _sampler(temperature, top_p, *, greedy, top_k, nucleus, vocab_size):
    def sample(logits, key):
        return sample_logits(
            logits,
            key,
            temperature=0 if greedy else temperature,
            top_k=top_k,
            top_p=top_p if nucleus else None,
            vocab_size=vocab_size,
        )

    return sample


@functools.partial(jax.jit, static_argnames=("graphdef", *_SAMPLING))
def _prefill_jit(graphdef, state, input_ids, key, temperature, top_p, **sampling):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(input_ids.shape[0])
    logits, cache = model(input_ids, cache=cache, last_only=True)  # (b, 1, v)
    first = _sampler(temperature, top_p, **sampling)(logits[:, -1], key)  # (b,)
    return first, model.decoder(batch_size=input_ids.shape[0]), cache.layers()


@functools.partial(jax.jit, static_argnames=("steps", *_SAMPLING), donate_argnames=("caches",))
def _decode_jit(decoder, token, caches, rng, temperature, top_p, *, steps, **sampling):
    sample = _sampler(temperature, top_p, **sampling)

    def body(carry, key):
        token, caches = carry
        logits, caches = decoder.step(token, caches)
        token = sample(logits, key)
        return (token, caches), token

    (_, caches), tokens = jax.lax.scan(body, (token, caches), jax.random.split(rng, steps))
    return tokens.T, caches  # (b, steps)


def _sampling_args(temperature, top_k, top_p, vocab_size):
    """(traced arguments, static arguments): new temperatures and top_p values reuse the
    compiled programs."""
    dynamic = (jnp.float32(max(temperature, 1e-6)), jnp.float32(1.0 if top_p is None else top_p))
    static = dict(
        greedy=temperature == 0,
        top_k=top_k,
        nucleus=top_p is not None and top_p < 1.0,
        vocab_size=vocab_size,
    )
    return dynamic, static


def prefill(model, input_ids, key, temperature=0.0, top_k=None, top_p=None):
    """The first of `generate`'s two programs (arguments as `generate`'s; `key` samples the first
    token). Returns (first new token (b,) int32, the model's `Decoder`, the per-layer caches)."""
    dynamic, static = _sampling_args(temperature, top_k, top_p, model.config.vocab_size)
    graphdef, state = nnx.split(model)
    return _prefill_jit(graphdef, state, input_ids, key, *dynamic, **static)


def decode(decoder, token, caches, steps, rng, temperature=0.0, top_k=None, top_p=None):
    """The second program: `steps` tokens after `token` (b,), in one loop. `caches` is donated
    (updated in place, unusable afterwards). Returns (tokens (b, steps) int32, the caches)."""
    dynamic, static = _sampling_args(temperature, top_k, top_p, decoder.config.vocab_size)
    return _decode_jit(decoder, token, caches, rng, *dynamic, steps=steps, **static)


def generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, rng=None):
    """Continues `input_ids` (b, l) by `max_new_tokens` tokens; returns (b, l + max_new_tokens) int32.

    temperature 0.0 is greedy; otherwise samples, optionally restricted to the top_k tokens and/or
    the smallest set of tokens with probability mass top_p. `rng` is a jax key (default key(0)).
    A prompt id outside [0, model.config.vocab_size) is a ValueError; when `generate` itself is
    traced (called inside jit) the ids cannot be checked, see `MambaLM._check_ids`.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim == 1:
        raise ValueError(f"input_ids must have shape (b, l), got {tuple(input_ids.shape)}")
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must have shape (b, l) with l >= 1, got {tuple(input_ids.shape)}"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if not isinstance(input_ids, jax.core.Tracer):
        lo, hi, vocab = int(input_ids.min()), int(input_ids.max()), model.config.vocab_size
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"input_ids holds token id {lo if lo < 0 else hi}, outside the vocabulary: ids "
                f"must be in [0, {vocab}) (model.config.vocab_size={vocab})"
            )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.padded_vocab_size:
        raise ValueError(f"top_k must be in [1, {model.config.padded_vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rng = jax.random.key(0) if rng is None else rng
    rng, key = jax.random.split(rng)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    first, decoder, caches = prefill(model, input_ids, key, **sampling)
    new = [input_ids.astype(jnp.int32), first[:, None]]
    if max_new_tokens > 1:
        new.append(decode(decoder, first, caches, max_new_tokens - 1, rng, **sampling)[0])
    return jnp.concatenate(new, axis=1)
