"""A decoder-only Transformer with a KV cache, in plain JAX: the decode benchmark's baseline.

Pre-RMSNorm blocks of causal self-attention (RoPE, `jax.nn.dot_product_attention`) and a GELU
MLP (4d), a tied head, bf16 weights. Layers are stacked and applied with `lax.scan`, like
MambaLM's, so both models compile to one block whatever the depth.

Decoding uses a preallocated cache (n_layer, b, max_len, h, dh) per K and V, written with
`dynamic_update_slice`; each new token attends over the whole buffer with a length mask, the
usual static-shape KV cache. Sizes that match a Mamba of the same parameter count: a Transformer
block holds 12 d^2 parameters and a Mamba block (expand 2) about 6 d^2, so n_layer is halved.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 50280
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "bfloat16"
    prefill_attention: str = "xla"  # "cudnn" (flash attention) on NVIDIA GPUs

    def __post_init__(self):
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into n_head={self.n_head} heads of even size"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def matched_config(d_model: int, mamba_layers: int, vocab_size: int, **kw) -> TransformerConfig:
    """A Transformer with about the parameters of a Mamba of this width and depth."""
    n_head = max(1, d_model // 128) if d_model >= 1024 else max(1, d_model // 64)
    return TransformerConfig(
        d_model=d_model, n_layer=max(1, mamba_layers // 2), n_head=n_head, vocab_size=vocab_size,
        **kw,
    )  # fmt: skip


def init_params(config: TransformerConfig, key) -> dict:
    """Random N(0, 0.02) weights (norm weights 1), layers stacked on a leading axis."""
    c, dt = config, jnp.dtype(config.dtype)
    d, f, L = c.d_model, c.mlp_ratio * c.d_model, c.n_layer
    ks = jax.random.split(key, 5)

    def normal(k, shape, std=0.02):
        return (std * jax.random.normal(k, shape, jnp.float32)).astype(dt)

    return {
        "embed": normal(ks[0], (c.vocab_size, d)),
        "layers": {
            "ln1": jnp.ones((L, d), dt), "wqkv": normal(ks[1], (L, d, 3 * d)),
            "wo": normal(ks[2], (L, d, d), 0.02 / math.sqrt(2 * L)),
            "ln2": jnp.ones((L, d), dt), "w1": normal(ks[3], (L, d, f)),
            "w2": normal(ks[4], (L, f, d), 0.02 / math.sqrt(2 * L)),
        },
        "ln_f": jnp.ones((d,), dt),
    }  # fmt: skip


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def init_cache(config: TransformerConfig, batch_size: int, max_len: int):
    shape = (config.n_layer, batch_size, max_len, config.n_head, config.head_dim)
    return jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)


def _rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    return (x32 * w.astype(jnp.float32)).astype(x.dtype)


def _rope(x, positions, base):
    """x: (b, l, h, dh); positions: (l,). Rotates pairs (i, i + dh/2) by position * base^(-2i/dh)."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (dh/2,)
    angle = positions.astype(jnp.float32)[:, None] * freq  # (l, dh/2)
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def forward(config: TransformerConfig, params, input_ids, cache, pos, last_only=False):
    """input_ids: (b, l) at positions pos .. pos + l - 1; cache: (k, v) each (L, b, T, h, dh).

    l > 1 is a prefill from pos 0 (attention within the chunk, causal); l == 1 is a decode step
    attending over cache positions 0 .. pos. Returns (logits (b, l, v) float32, cache), or only
    the last position's logits (b, 1, v) with last_only, as a prefill needs."""
    c = config
    b, l = input_ids.shape
    x = params["embed"][input_ids]  # (b, l, d)
    positions = pos + jnp.arange(l)

    def block(x, layer):
        w, k_cache, v_cache = layer
        h = _rms_norm(x, w["ln1"], c.norm_eps)
        qkv = (h @ w["wqkv"]).reshape(b, l, 3, c.n_head, c.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, l, h, dh)
        q, k = _rope(q, positions, c.rope_base), _rope(k, positions, c.rope_base)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, pos, 0, 0))
        if l > 1:
            att = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=c.prefill_attention
            )
        else:
            lengths = jnp.full((b,), pos + 1, jnp.int32)
            att = jax.nn.dot_product_attention(
                q, k_cache, v_cache, key_value_seq_lengths=lengths, implementation="xla"
            )
        x = x + att.reshape(b, l, c.d_model) @ w["wo"]
        h = _rms_norm(x, w["ln2"], c.norm_eps)
        x = x + jax.nn.gelu(h @ w["w1"]) @ w["w2"]
        return x, (k_cache, v_cache)

    x, cache = jax.lax.scan(block, x, (params["layers"], *cache))
    x = _rms_norm(x[:, -1:] if last_only else x, params["ln_f"], c.norm_eps)
    logits = jnp.einsum("bld,vd->blv", x, params["embed"], preferred_element_type=jnp.float32)
    return logits, cache


def prefill(config, params, input_ids, max_len):
    """-> (last logits (b, v), cache holding the prompt)."""
    cache = init_cache(config, input_ids.shape[0], max_len)
    logits, cache = forward(config, params, input_ids, cache, 0, last_only=True)
    return logits[:, -1], cache


def decode(config, params, first_token, cache, start, steps, vocab_size=None):
    """Greedy decoding of `steps` tokens from `first_token` (b,) at position `start`: one loop.

    vocab_size: ids at or above it (the embedding's padding rows) are never chosen."""

    def body(carry, _):
        token, cache, pos = carry
        logits, cache = forward(config, params, token[:, None], cache, pos)
        nxt = jnp.argmax(logits[:, 0, :vocab_size], -1).astype(jnp.int32)
        return (nxt, cache, pos + 1), nxt

    (_, cache, _), tokens = jax.lax.scan(body, (first_token, cache, start), None, length=steps)
    return tokens.T, cache  # (b, steps)


class Runner:
    """A random Transformer matched to a Mamba of `d_model` and `mamba_layers`, with jitted
    prefill and decode programs (decode donates the cache), as benchmarks/decode.py times them."""

    def __init__(self, d_model, mamba_layers, vocab, max_len, attention):
        self.config = matched_config(
            d_model, mamba_layers, ((vocab + 7) // 8) * 8, prefill_attention=attention
        )
        self.state = init_params(self.config, jax.random.key(0))
        self.vocab, self.max_len = vocab, max_len
        self.params = count_params(self.state)
        self.prefill = jax.jit(self._prefill)
        self.decode = jax.jit(self._decode, static_argnums=3, donate_argnums=2)

    def _prefill(self, params, ids):
        logits, cache = prefill(self.config, params, ids, self.max_len)
        return jnp.argmax(logits[:, : self.vocab], -1).astype(jnp.int32), cache

    def _decode(self, params, token, cache, steps):
        start = self.max_len - steps - 1  # the prompt's length: the first new token goes there
        return decode(self.config, params, token, cache, start, steps, self.vocab)

    def check(self, key, prefix=16):
        """Relative error of prefill + one cached step against the full forward's last logits."""
        c, p = self.config, self.state
        ids = jax.random.randint(key, (2, prefix + 1), 0, self.vocab)
        full, _ = forward(c, p, ids, init_cache(c, 2, prefix + 1), 0)
        _, cache = forward(c, p, ids[:, :prefix], init_cache(c, 2, prefix + 1), 0)
        step, _ = forward(c, p, ids[:, prefix:], cache, prefix)
        full, step = full[:, -1].astype(jnp.float32), step[:, 0].astype(jnp.float32)
        return float(jnp.linalg.norm(step - full) / jnp.maximum(jnp.linalg.norm(full), 1e-30))

    def time(self, prompt, new, reps):
        """Median (prefill s, decode s) of `new` tokens over reps runs after one warm-up, on fresh
        prompts from prompt(key) each run."""
        key = jax.random.key(0)
        pre, dec = [], []
        for i in range(reps + 1):
            key, k = jax.random.split(key)
            ids = prompt(k)
            t0 = time.perf_counter()
            first, cache = jax.block_until_ready(self.prefill(self.state, ids))
            t1 = time.perf_counter()
            jax.block_until_ready(self.decode(self.state, first, cache, new - 1))
            t2 = time.perf_counter()
            if i:
                pre.append(t1 - t0)
                dec.append(t2 - t1)
        return statistics.median(pre), statistics.median(dec)
