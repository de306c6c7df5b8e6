"""Sampling from a MambaLM: one compiled program holds the prefill and the whole decode loop.

Decoding is the recurrent mode of the SSM (paper section 3.4): each new token costs O(1) time and
memory, because the state (b, e, n) and the conv window (b, w - 1, e) summarise the whole prefix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits, rng, *, temperature, top_k=None, top_p=None, vocab_size=None):
    """logits: (b, v) float32 -> token ids (b,) int32.

    temperature 0 means greedy. Padded vocab entries (>= vocab_size) are never sampled.
    """
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        valid = jnp.arange(logits.shape[-1]) < vocab_size
        logits = jnp.where(valid, logits, -jnp.inf)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (b, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p; the top token is always kept.
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "nucleus", "vocab_size"),
)
def _generate_jit(graphdef, state, input_ids, rng, temperature, top_p, *, max_new_tokens, greedy,
                  top_k, nucleus, vocab_size):  # fmt: skip
    model = nnx.merge(graphdef, state)
    bsz = input_ids.shape[0]
    temp = 0 if greedy else temperature

    def sample(logits, key):
        return sample_logits(
            logits, key, temperature=temp, top_k=top_k, top_p=top_p if nucleus else None,
            vocab_size=vocab_size,
        )  # fmt: skip

    logits, cache = model(input_ids, cache=model.init_cache(bsz), last_only=True)  # (b, 1, v)
    rng, key = jax.random.split(rng)
    first = sample(logits[:, -1], key)  # (b,)

    def body(carry, key):
        token, cache = carry
        # Rebuild the module inside the loop body: nnx objects must belong to the current trace.
        logits, cache = nnx.merge(graphdef, jax.tree.map(lambda x: x, state)).step(token, cache)
        nxt = sample(logits, key)
        return (nxt, cache), nxt

    keys = jax.random.split(rng, max_new_tokens - 1)
    _, rest = jax.lax.scan(body, (first, cache), keys)  # (max_new_tokens - 1, b)
    new = jnp.concatenate([first[:, None], rest.T], axis=1)  # (b, max_new_tokens)
    return jnp.concatenate([input_ids.astype(jnp.int32), new], axis=1)


def generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, rng=None):
    """Continues `input_ids` (b, l) by `max_new_tokens` tokens; returns (b, l + max_new_tokens) int32.

    temperature 0.0 is greedy; otherwise samples, optionally restricted to the top_k tokens and/or
    the smallest set of tokens with probability mass top_p. `rng` is a jax key (default key(0)).
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
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.padded_vocab_size:
        raise ValueError(f"top_k must be in [1, {model.config.padded_vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef, state, input_ids, rng, jnp.float32(max(temperature, 1e-6)),
        jnp.float32(1.0 if top_p is None else top_p),
        max_new_tokens=max_new_tokens, greedy=temperature == 0, top_k=top_k,
        nucleus=top_p is not None and top_p < 1.0, vocab_size=model.config.vocab_size,
    )  # fmt: skip
