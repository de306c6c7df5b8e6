"""ResidualBlock and MambaLM (paper section 3.4: a homogeneous stack of Mamba blocks)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.layers import RMSNorm, partitioned
from mamba_jax.mixer import MambaMixer


class MambaCache(NamedTuple):
    """Decoding state of every layer, stacked on a leading layer axis."""

    conv: jax.Array  # (n_layer, b, w - 1, e) the last w - 1 conv inputs, compute dtype
    ssm: jax.Array  # (n_layer, b, e, n) the SSM state, float32


class ResidualBlock(nnx.Module):
    """x + Mixer(RMSNorm(x)), with the residual stream kept in fp32."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=jnp.dtype(config.dtype))
        self.mixer = MambaMixer(config, rngs=rngs)

    def __call__(self, x, cache=None):
        """x: (b, l, d) float32 residual stream."""
        if cache is None:
            return x + self.mixer(self.norm(x)).astype(jnp.float32)
        out, cache = self.mixer(self.norm(x), cache)
        return x + out.astype(jnp.float32), cache

    def step(self, x, cache):
        """x: (b, d) float32."""
        out, cache = self.mixer.step(self.norm(x), cache)
        return x + out.astype(jnp.float32), cache


class MambaLM(nnx.Module):
    """embed -> [ResidualBlock x n_layer] -> RMSNorm -> tied lm_head.

    Layers are created with `nnx.vmap` and applied with `nnx.scan`, so their parameters carry a
    leading (n_layer,) axis and the compiled program holds one block, whatever the depth.
    """

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        self.embedding = nnx.Embed(
            config.padded_vocab_size, config.d_model,
            dtype=self.dtype, param_dtype=jnp.dtype(config.param_dtype),
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )  # fmt: skip

        @nnx.split_rngs(splits=config.n_layer)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create_blocks(rngs):
            return ResidualBlock(config, rngs=rngs)

        self.layers = create_blocks(rngs)
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps, dtype=self.dtype)

    def _check_ids(self, input_ids, rank, name="input_ids"):
        if input_ids.ndim != rank or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            shape = "(b, l)" if rank == 2 else "(b,)"
            raise ValueError(
                f"{name} must be an integer array of shape {shape}, "
                f"got {input_ids.dtype} {tuple(input_ids.shape)}"
            )

    def _logits(self, x):
        x = self.norm_f(x)
        table = self.embedding.embedding[...].astype(self.dtype)  # (v, d), tied head
        return jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, cache: MambaCache | None = None, *, last_only: bool = False):
        """input_ids: (b, l) int. Returns logits (b, l, v) float32, plus the updated cache if given.

        last_only=True computes the head on the last position only, (b, 1, v): a prefill for
        decoding needs no more, and the full (b, l, v) float32 logits can be gigabytes.
        """
        self._check_ids(input_ids, 2)
        x = self.embedding(input_ids).astype(jnp.float32)  # (b, l, d)
        remat = self.config.remat

        if cache is None:

            def body(x, block):
                fn = nnx.remat(lambda blk, h: blk(h)) if remat else (lambda blk, h: blk(h))
                return fn(block, x)

            x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
            return self._logits(x[:, -1:] if last_only else x)

        def body_cached(x, block, conv, ssm):
            x, (conv, ssm) = block(x, (conv, ssm))
            return x, (conv, ssm)

        x, (conv, ssm) = nnx.scan(
            body_cached, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0)
        )(x, self.layers, cache.conv, cache.ssm)
        return self._logits(x[:, -1:] if last_only else x), MambaCache(conv, ssm)

    def step(self, token_ids, cache: MambaCache):
        """token_ids: (b,) int. Returns (logits (b, v) float32, updated cache)."""
        self._check_ids(token_ids, 1, "token_ids")
        x = self.embedding(token_ids).astype(jnp.float32)  # (b, d)

        def body(x, block, conv, ssm):
            x, (conv, ssm) = block.step(x, (conv, ssm))
            return x, (conv, ssm)

        x, (conv, ssm) = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
            x, self.layers, cache.conv, cache.ssm
        )
        return self._logits(x), MambaCache(conv, ssm)

    def init_cache(self, batch_size: int) -> MambaCache:
        c = self.config
        conv = jnp.zeros((c.n_layer, batch_size, c.d_conv - 1, c.d_inner), self.dtype)
        ssm = jnp.zeros((c.n_layer, batch_size, c.d_inner, c.d_state), jnp.float32)
        return MambaCache(conv, ssm)


def abstract_model(config: MambaConfig) -> MambaLM:
    """A MambaLM whose parameters are ShapeDtypeStructs (with their logical axis metadata):
    the structure to restore or load into, allocating nothing."""
    return nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0)))


def with_config(model: MambaLM, **changes) -> MambaLM:
    """The same parameters in a MambaLM built from `model.config.replace(**changes)`.

    Each parameter is cast to the dtype the new config gives it (with param_dtype="bfloat16",
    A_log, D and the dt bias stay float32) and keeps its sharding. For example
    `with_config(model, scan_impl="reference")` or
    `with_config(model, dtype="bfloat16", param_dtype="bfloat16")`."""
    config = model.config.replace(**changes)
    graphdef, abstract = nnx.split(abstract_model(config))
    values = dict(nnx.to_flat_state(nnx.state(model)))
    leaves = []
    for path, var in nnx.to_flat_state(abstract):
        if path not in values:
            raise ValueError(f"with_config({changes}) changes the parameters: no {path} in model")
        leaves.append((path, var.replace(values[path].get_value().astype(var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def count_params(tree) -> int:
    """Number of parameters of a MambaLM, an nnx.State or a pytree of arrays."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(tree))
