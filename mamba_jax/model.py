"""ResidualBlock and MambaLM (paper section 3.4: a homogeneous stack of Mamba blocks)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.layers import RMSNorm, causal_conv1d_step, partitioned, rms_norm
from mamba_jax.mixer import MambaMixer
from mamba_jax.scan import segment_ids_from_positions, selective_scan_step
from pallas_kernels import SCAN_CHECKPOINTS


class MambaCache(NamedTuple):
    """Decoding state of every layer, stacked on a leading layer axis."""

    conv: jax.Array  # (n_layer, b, w - 1, e) the last w - 1 conv inputs, compute dtype
    ssm: jax.Array  # (n_layer, b, e, n) the SSM state, float32

    def layers(self) -> tuple:
        """The per-layer form `Decoder.step` takes: n_layer pairs (conv (b, w - 1, e), ssm (b, e, n))."""
        return tuple((self.conv[i], self.ssm[i]) for i in range(self.conv.shape[0]))

    @classmethod
    def stack(cls, layers) -> MambaCache:
        """The inverse of `layers()`."""
        conv, ssm = zip(*layers, strict=True)
        return cls(jnp.stack(conv), jnp.stack(ssm))


class ResidualBlock(nnx.Module):
    """x + Mixer(RMSNorm(x)), with the residual stream kept in fp32."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=jnp.dtype(config.dtype))
        self.mixer = MambaMixer(config, rngs=rngs)

    def __call__(self, x, cache=None, segment_ids=None, padding_mask=None):
        """x: (b, l, d) float32 residual stream; segment_ids (b, l) int or None; padding_mask
        (b, l) bool or None."""
        kw = dict(segment_ids=segment_ids, padding_mask=padding_mask)
        if cache is None:
            return x + self.mixer(self.norm(x), **kw).astype(jnp.float32)
        out, cache = self.mixer(self.norm(x), cache, **kw)
        return x + out.astype(jnp.float32), cache

    def step(self, x, cache, A=None):
        """x: (b, d) float32; A: the mixer's (e, n) A computed ahead, or None."""
        out, cache = self.mixer.step(self.norm(x), cache, A=A)
        return x + out.astype(jnp.float32), cache


def _cast_once(state: nnx.State, dtype) -> nnx.State:
    """The block weights that the forward casts to the compute dtype at every use (the linear and
    conv kernels and biases), cast to it; A_log, D, the dt bias and the norm weights are used in
    float32 and stay as they are."""
    leaves = []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "kernel" or (path[-1] == "bias" and path[-2] != "dt_proj"):
            var = var.replace(var.get_value().astype(dtype))
        leaves.append((path, var))
    return nnx.from_flat_state(leaves)


def _matvec(x, w_t, out_dtype=None):
    """x: (b, k); w_t: (m, k), a weight stored transposed -> (b, m), accumulated in fp32.

    Written as a product and a sum over the contiguous axis, which XLA fuses into one row
    reduction that streams w_t once at batch 1. XLA compiles a (1, k) @ (k, m) dot into column
    reductions, unfused multiplies or cuBLAS calls instead: with this layout the 1.4b model's
    batch-1 step went from 3.03 to 1.51 ms per token (one H200, 2026-12-01, benchmarks/decode.py)."""
    out = jnp.sum(x[:, None, :].astype(jnp.float32) * w_t.astype(jnp.float32), axis=-1)
    return out.astype(out_dtype or x.dtype)


def _matvec_block_step(c: MambaConfig, w: dict, A, x, cache):
    """ResidualBlock.step over `_matvec_weights`: the same computation, for one token (b == 1)."""
    dtype = jnp.dtype(c.dtype)
    conv_state, ssm_state = cache
    xz = _matvec(rms_norm(x, w["norm"], c.norm_eps, dtype), w["in_proj"])  # (b, 2e)
    xs, z = jnp.split(xz, 2, axis=-1)  # (b, e) each
    u, conv_state = causal_conv1d_step(xs, conv_state, w["conv"], w["conv_bias"], dtype, silu=True)
    dt, B, C = jnp.split(_matvec(u, w["x_proj"]), [c.dt_rank, c.dt_rank + c.d_state], axis=-1)
    delta = _matvec(dt, w["dt_proj"])  # (b, e)
    y, ssm_state = selective_scan_step(
        u, delta, A, B, C, w["D"], z, w["dt_bias"], state=ssm_state, delta_softplus=True
    )
    return x + _matvec(y, w["out_proj"], jnp.float32), (conv_state, ssm_state)


def _matvec_weights(stacked: nnx.State) -> dict:
    """The stacked block weights (cast) -> {name: (n_layer, ...) array}, matrices transposed."""
    m = stacked["mixer"]

    def t(name):  # (n_layer, in, out) -> (n_layer, out, in)
        return jnp.swapaxes(m[name]["kernel"][...], 1, 2)

    return {
        "norm": stacked["norm"]["weight"][...],
        "in_proj": t("in_proj"),
        "conv": m["conv1d"]["kernel"][...],
        "conv_bias": m["conv1d"]["bias"][...] if "bias" in m["conv1d"] else None,
        "x_proj": t("x_proj"),
        "dt_proj": t("dt_proj"),
        "dt_bias": m["dt_proj"]["bias"][...],
        "D": m["D"][...],
        "out_proj": t("out_proj"),
    }


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["embedding", "norm_f", "blocks", "A"],
    meta_fields=["config", "norm_def", "block_def", "matvec"],
)
@dataclasses.dataclass(frozen=True)
class Decoder:
    """A MambaLM's weights laid out for decoding, and the one-token step over them.

    `MambaLM.decoder()` makes it once per generation (inside jit): every weight the forward casts
    to the compute dtype is cast once, each layer's weights are buffers of their own rather than
    slices of the stacked (n_layer, ...) parameters (which a per-token program would copy out
    again at every token), and A = -exp(A_log) is computed once. `step` runs the layers as
    straight-line code: a jitted token loop compiles to one body of about 11 kernels per layer
    and no inner loop (a loop over layers there splits each token into many small launches and
    copies; profiled on an H200, 2026-12-01, the 1.4b model's tokens then ran back to back with
    no idle GPU time between kernels). It computes what `MambaLM.step` does.

    With `matvec` (made for batch 1) the matrices are stored transposed, (out, in), and applied
    as matrix-vector products that XLA fuses into single bandwidth-bound kernels (`_matvec`); it
    stays correct at any batch, but reads every matrix once per row, so larger batches use the
    (in, out) matmuls of the modules.
    """

    embedding: jax.Array  # (v, d) compute dtype: the input table and the tied head
    norm_f: nnx.State  # the final RMSNorm's weight
    blocks: tuple  # n_layer nnx.States of one ResidualBlock each; with matvec, dicts of arrays
    A: tuple  # n_layer (e, n) float32
    config: MambaConfig
    norm_def: nnx.GraphDef
    block_def: nnx.GraphDef
    matvec: bool = False

    def step(self, token_ids, caches):
        """token_ids: (b,) int; caches: n_layer pairs (conv (b, w - 1, e), ssm (b, e, n)), as
        `MambaCache.layers()` gives. Returns (logits (b, v) float32, the updated pairs)."""
        x = jnp.take(self.embedding, token_ids, axis=0).astype(jnp.float32)  # (b, d)
        new = []
        for weights, A, cache in zip(self.blocks, self.A, caches, strict=True):
            if self.matvec:
                x, cache = _matvec_block_step(self.config, weights, A, x, cache)
            else:
                x, cache = nnx.merge(self.block_def, weights).step(x, cache, A=A)
            new.append(cache)
        h = nnx.merge(self.norm_def, self.norm_f)(x)  # (b, d) compute dtype
        if self.matvec:
            return _matvec(h, self.embedding, jnp.float32), tuple(new)  # the table is (v, d)
        logits = jnp.einsum("bd,vd->bv", h, self.embedding, preferred_element_type=jnp.float32)
        return logits, tuple(new)


# What a rematerialised block keeps for its backward (MambaConfig.remat): the names tagged in
# mixer.py on the in_proj halves and the x_proj output. Everything else in the block (RMSNorm,
# conv + SiLU, Δ, the scan) is recomputed from those and the block input.
REMAT_SAVED = ("mixer_x", "mixer_z", "x_dbl")
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED)
# MambaConfig.remat_keep_scan: also the scan's output and the kernel's state checkpoints (tagged
# by every kernel's forward), so the backward skips the forward kernel.
REMAT_SAVED_KEEP_SCAN = (*REMAT_SAVED, "mixer_y", SCAN_CHECKPOINTS)
REMAT_POLICY_KEEP_SCAN = jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED_KEEP_SCAN)


def _apply_block(block, x, segment_ids=None, padding_mask=None, cache=None):
    return block(x, cache, segment_ids=segment_ids, padding_mask=padding_mask)


def _fill_padded_segments(segment_ids, padding_mask):
    """A padded position takes the segment id of the nearest real token before it (of the first
    real token, for left padding), so that no segment starts at a padded position: the state
    passes through padding unchanged."""
    positions = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    last_real = jax.lax.cummax(jnp.where(padding_mask, positions, -1), axis=1)  # (b, l)
    first_real = jnp.argmax(padding_mask, axis=1)[:, None].astype(jnp.int32)  # (b, 1)
    source = jnp.where(last_real < 0, first_real, last_real)
    return jnp.take_along_axis(segment_ids, source, axis=1)


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
        """Checks the rank and dtype of token ids and, where their values are known (an eager
        call, not a jax tracer), that each id is in [0, config.vocab_size).

        Inside jit nothing can check the values, and a bad id does not raise: an id >=
        padded_vocab_size embeds as NaN (so its row's logits are NaN from there on, through the
        scan's state), a negative id counts from the end of the padded table (-1 reads its last
        row), and an id in [vocab_size, padded_vocab_size) reads a padding row. Check ids before
        a jitted call."""
        if input_ids.ndim != rank or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            shape = "(b, l)" if rank == 2 else "(b,)"
            raise ValueError(
                f"{name} must be an integer array of shape {shape}, "
                f"got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if isinstance(input_ids, jax.core.Tracer) or input_ids.size == 0:
            return
        if not getattr(input_ids, "is_fully_addressable", True):
            return  # spread over several processes: no one process can read every id
        # On the host: under a trace, even a constant's min() would be a tracer.
        ids = np.asarray(input_ids)
        lo, hi, vocab = int(ids.min()), int(ids.max()), self.config.vocab_size
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{name} holds token id {lo if lo < 0 else hi}, outside the vocabulary: ids must "
                f"be in [0, {vocab}) (config.vocab_size={vocab})"
            )

    def _check_segments(self, input_ids, segment_ids, position_ids):
        """The packed-row arguments -> segment ids (b, l) int or None; position ids that restart
        at 0 become segment ids here, in one place."""
        if segment_ids is not None and position_ids is not None:
            raise ValueError("give segment_ids or position_ids, not both")
        given, name = (
            (segment_ids, "segment_ids") if position_ids is None else (position_ids, "position_ids")
        )
        if given is None:
            return None
        if not hasattr(given, "shape") or tuple(given.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} must have the shape of input_ids (b, l)={tuple(input_ids.shape)}, "
                f"got {tuple(getattr(given, 'shape', ()))}"
            )
        if not jnp.issubdtype(given.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {given.dtype}")
        return given if position_ids is None else segment_ids_from_positions(given)

    def _check_padding(self, input_ids, padding_mask, segment_ids, with_state):
        """padding_mask -> (bool (b, l) or None, segment ids with padded positions filled).

        Each row's real tokens must be contiguous at its start (right padding) or at its end
        (left padding); with a cache or carried state only right padding is exact (a state
        carried in must meet the row's first token), so left padding is refused there. The
        pattern is checked where the values are known (not inside jit)."""
        if padding_mask is None:
            return None, segment_ids
        shape = tuple(getattr(padding_mask, "shape", ()))
        if shape != tuple(input_ids.shape):
            raise ValueError(
                f"padding_mask must have the shape of input_ids (b, l)={tuple(input_ids.shape)}, "
                f"got {shape}"
            )
        if not (padding_mask.dtype == jnp.bool_ or jnp.issubdtype(padding_mask.dtype, jnp.integer)):
            raise ValueError(f"padding_mask must be bool or 0/1 integers, got {padding_mask.dtype}")
        concrete = not isinstance(padding_mask, jax.core.Tracer)
        if concrete and getattr(padding_mask, "is_fully_addressable", True):
            m = np.asarray(padding_mask)
            if not np.isin(m, (0, 1)).all():
                raise ValueError("padding_mask must hold only 0/1 (or False/True)")
            m = m.astype(bool)
            bad = np.flatnonzero(np.sum(m[:, 1:] != m[:, :-1], axis=1) > 1)
            if bad.size:
                raise ValueError(
                    f"padding_mask row {bad[0]} has padding between real tokens: each row's "
                    "real tokens must be contiguous, padded at the start (left) or the end "
                    "(right)"
                )
            left = np.flatnonzero(~m[:, 0] & m.any(axis=1))
            if with_state and left.size:
                raise ValueError(
                    f"padding_mask row {left[0]} is left-padded, but with a cache (or carried "
                    "state) padding must be at the end of the row (right padding)"
                )
        padding_mask = padding_mask.astype(jnp.bool_)
        if segment_ids is not None:
            segment_ids = _fill_padded_segments(segment_ids, padding_mask)
        return padding_mask, segment_ids

    def _trunk(self, x, segment_ids=None, padding_mask=None, cache=None):
        """The layer stack: x (b, l, d) float32 embeddings -> residual stream (and, with a
        MambaCache, the updated cache).

        With config.remat each block is rematerialised under `REMAT_POLICY`: the backward keeps
        the block input and the outputs of in_proj and x_proj, and recomputes the norm, the conv,
        Δ and the scan's forward kernel (all cheap next to the matmuls they feed). With
        config.remat_keep_scan too, `REMAT_POLICY_KEEP_SCAN` also keeps the scan's output and its
        kernel's state checkpoints, so the forward kernel is not run again.

        config.scan_layers=False (training and scoring only; decoding with a cache always scans)
        applies the layers one after another in the program instead of under `nnx.scan`, and
        config.remat_keep_scan_layers=k then keeps the scan in the first k layers only."""
        c = self.config
        keep = c.n_layer if c.remat_keep_scan_layers is None else c.remat_keep_scan_layers
        keep = keep if c.remat_keep_scan else 0

        def layer_fn(i):
            if not c.remat:
                return _apply_block
            policy = REMAT_POLICY_KEEP_SCAN if i < keep else REMAT_POLICY
            # Under nnx.scan nothing can merge the recomputation with the forward; unrolled,
            # XLA's CSE would (and so keep everything), unless prevent_cse fences it off.
            return nnx.remat(_apply_block, policy=policy, prevent_cse=not c.scan_layers)

        apply = layer_fn(0)

        if cache is None and not self.config.scan_layers:
            # One split per stacked weight: its gradient is one concatenate, where n_layer
            # separate slices would each be transposed into a zero-padded (n_layer, ...) array.
            graphdef, weights = nnx.split(self.layers)
            leaves, treedef = jax.tree.flatten(weights)
            parts = [jnp.split(w, self.config.n_layer) for w in leaves]
            for i in range(self.config.n_layer):
                layer = jax.tree.unflatten(treedef, [p[i][0] for p in parts])
                x = layer_fn(i)(nnx.merge(graphdef, layer), x, segment_ids, padding_mask)
            return x

        if cache is None:

            def body(x, block):
                return apply(block, x, segment_ids, padding_mask)

            return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)

        def body_cached(x, block, conv, ssm):
            return apply(block, x, segment_ids, padding_mask, (conv, ssm))

        x, (conv, ssm) = nnx.scan(
            body_cached, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0)
        )(x, self.layers, cache.conv, cache.ssm)
        return x, MambaCache(conv, ssm)

    def _check_cache(self, cache, batch):
        c = self.config
        want = {
            "conv": ((c.n_layer, batch, c.d_conv - 1, c.d_inner), "(n_layer, b, d_conv - 1, e)"),
            "ssm": ((c.n_layer, batch, c.d_inner, c.d_state), "(n_layer, b, e, d_state)"),
        }
        if not isinstance(cache, MambaCache):
            raise ValueError(f"cache must be a MambaCache, got {type(cache).__name__}")
        for name, (shape, meaning) in want.items():
            got = tuple(getattr(cache, name).shape)
            if got != shape:
                raise ValueError(f"cache.{name} must have shape {meaning}={shape}, got {got}")

    def _prepare(self, input_ids, cache, segment_ids, position_ids, padding_mask):
        """Checks a forward's arguments; returns (embeddings (b, l, d) float32, segment ids,
        padding mask)."""
        self._check_ids(input_ids, 2)
        segment_ids = self._check_segments(input_ids, segment_ids, position_ids)
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        padding_mask, segment_ids = self._check_padding(
            input_ids, padding_mask, segment_ids, cache is not None
        )
        return self.embedding(input_ids).astype(jnp.float32), segment_ids, padding_mask

    def hidden_states(
        self,
        input_ids,
        cache: MambaCache | None = None,
        *,
        segment_ids=None,
        position_ids=None,
        padding_mask=None,
    ):
        """input_ids: (b, l) int -> the final normalised hidden states (b, l, d) in the compute
        dtype: what the tied head multiplies. The training loss takes these and the embedding
        table (`mamba_jax.losses`), so the (b, l, v) logits are never whole in memory.
        segment_ids / position_ids / padding_mask: as in `__call__`. With a cache (the states
        a previous window ended with, e.g. carried across training windows) returns (hidden,
        the updated cache); gradients flow into the cache's arrays too."""
        x, segment_ids, padding_mask = self._prepare(
            input_ids, cache, segment_ids, position_ids, padding_mask
        )
        if cache is None:
            return self.norm_f(self._trunk(x, segment_ids, padding_mask))
        x, cache = self._trunk(x, segment_ids, padding_mask, cache)
        return self.norm_f(x), cache

    def _logits(self, x):
        x = self.norm_f(x)
        table = self.embedding.embedding[...].astype(self.dtype)  # (v, d), tied head
        return jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids,
        cache: MambaCache | None = None,
        *,
        segment_ids=None,
        position_ids=None,
        padding_mask=None,
        last_only: bool = False,
    ):
        """input_ids: (b, l) int. Returns logits (b, l, v) float32, plus the updated cache if given.

        segment_ids: (b, l) int or None, for rows that pack several documents: where the id
        changes, the scan's state restarts from zero and the causal conv does not reach back
        across the boundary, so no document sees another. position_ids that restart at 0 for
        each document may be given instead. padding_mask: (b, l) bool or 0/1 or None, True at
        real tokens, for rows of different lengths padded at the start (left) or the end
        (right; the only form allowed with a cache): a padded token changes neither the SSM
        state nor the conv window (its Δ is 0 and its conv input 0), so every real token's
        logits and the cache after the row equal those of the row unpadded; the logits at
        padded positions mean nothing. last_only=True computes the head on the last position
        only, (b, 1, v): a prefill for decoding needs no more, and the full (b, l, v) float32
        logits can be gigabytes.
        """
        x, segment_ids, padding_mask = self._prepare(
            input_ids, cache, segment_ids, position_ids, padding_mask
        )
        if cache is None:
            x = self._trunk(x, segment_ids, padding_mask)
            return self._logits(x[:, -1:] if last_only else x)
        x, cache = self._trunk(x, segment_ids, padding_mask, cache)
        return self._logits(x[:, -1:] if last_only else x), cache

    def step(self, token_ids, cache: MambaCache):
        """token_ids: (b,) int. Returns (logits (b, v) float32, updated cache).

        One call prepares the weights for this one token (`decoder()`); a loop over tokens
        should call `decoder()` once and `Decoder.step` per token, as `generate` does."""
        self._check_ids(token_ids, 1, "token_ids")
        decoder = self.decoder(batch_size=token_ids.shape[0])
        logits, layers = decoder.step(token_ids, cache.layers())
        return logits, MambaCache.stack(layers)

    def decoder(self, batch_size: int | None = None) -> Decoder:
        """This model's weights laid out for decoding (see `Decoder`) batches of `batch_size`
        (batch 1 gets the matrix-vector layout); traceable, so call it inside the jitted program
        that decodes."""
        c = self.config
        block_def, stacked = nnx.split(self.layers)
        stacked = _cast_once(stacked, self.dtype)
        # The matrix-vector step covers the standard block (selective, no projection biases).
        matvec = batch_size == 1 and c.selective and not c.bias
        if matvec:
            stacked = _matvec_weights(stacked)
        A = self.layers.mixer.A()  # (n_layer, e, n)
        norm_def, norm_f = nnx.split(self.norm_f)
        return Decoder(
            embedding=self.embedding.embedding[...].astype(self.dtype),
            norm_f=norm_f,
            blocks=tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(c.n_layer)),
            A=tuple(A[i] for i in range(c.n_layer)),
            config=c,
            norm_def=norm_def,
            block_def=block_def,
            matvec=matvec,
        )

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
