"""MambaMixer: the selective SSM block (paper Figure 3, right; Algorithm 2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mamba_jax.config import MambaConfig
from mamba_jax.layers import (
    CausalConv1d,
    conv_segment_mask,
    conv_tail,
    inverse_softplus,
    logical_param,
    partitioned,
    scaled,
    torch_linear_init,
)
from mamba_jax.scan import selective_scan, selective_scan_step

# Δ before the softplus at a padded position: softplus(PAD_DELTA + bias) is exactly 0 in float32
# (and in every implementation's arithmetic), so exp(Δ A) = 1 and Δ u B = 0: the state passes
# through unchanged and its gradient is exactly zero there. Representable in float16.
PAD_DELTA = -1.0e4


class MambaMixer(nnx.Module):
    """in_proj -> (x, z); x -> causal conv -> silu -> x_proj -> (dt, B, C); dt_proj -> Δ;
    y = S6(x, Δ, A, B, C, D) * silu(z); out_proj(y).

    With `config.selective=False` (the paper's Table 1 ablation) Δ, B and C are learned
    per-channel/per-state constants that do not depend on the input: an LTI, S4-like layer.
    """

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        e, n, r, d = c.d_inner, c.d_state, c.dt_rank, c.d_model
        dtype, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.dtype = dtype

        def linear(fan_in, fan_out, names, init=None, use_bias=False):
            return nnx.Linear(
                fan_in, fan_out, use_bias=use_bias, dtype=dtype, param_dtype=pdt,
                kernel_init=partitioned(init or torch_linear_init(fan_in), names),
                bias_init=partitioned(nnx.initializers.zeros_init(), (names[1],)),
                rngs=rngs,
            )  # fmt: skip

        self.in_proj = linear(d, 2 * e, ("embed", "inner"), use_bias=c.bias)
        self.conv1d = CausalConv1d(
            e,
            c.d_conv,
            use_bias=c.conv_bias,
            dtype=dtype,
            param_dtype=pdt,
            impl=c.conv_impl,
            rngs=rngs,
        )
        self.x_proj = linear(e, r + 2 * n, ("inner", None))
        # dt_proj: weight ~ U(-r^-0.5, r^-0.5); bias = softplus^-1(dt), dt log-uniform in
        # [dt_min, dt_max] (paper section 3.6 / appendix, official init). Kept in fp32.
        self.dt_proj = nnx.Linear(
            r, e, use_bias=True, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(scaled(torch_linear_init(1), r**-0.5), (None, "inner")),
            bias_init=partitioned(self._dt_bias_init, ("inner",)),
            rngs=rngs,
        )  # fmt: skip
        # S4D-Real initialisation: A[d, i] = -(i + 1).
        a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (e, n)))
        self.A_log = logical_param(a_log, ("inner", None))
        self.D = logical_param(jnp.ones((e,), jnp.float32), ("inner",))
        out_init = torch_linear_init(e)
        if c.rescale_prenorm_residual:
            out_init = scaled(out_init, 1.0 / math.sqrt(c.n_layer))
        self.out_proj = linear(e, d, ("inner", "embed"), init=out_init, use_bias=c.bias)
        if not c.selective:
            # Input-independent Δ (pre-softplus), B and C for the LTI ablation.
            self.lti_dt = logical_param(jnp.zeros((e,), jnp.float32), ("inner",))
            k1, k2 = jax.random.split(rngs.params())
            self.lti_B = logical_param(jax.random.normal(k1, (n,), jnp.float32), (None,))
            self.lti_C = logical_param(jax.random.normal(k2, (n,), jnp.float32), (None,))

    def _dt_bias_init(self, key, shape, dtype=jnp.float32):
        c = self.config
        lo, hi = math.log(c.dt_min), math.log(c.dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (hi - lo) + lo)
        return inverse_softplus(jnp.maximum(dt, c.dt_init_floor)).astype(dtype)

    def _ssm_inputs(self, x):
        """x: (..., e) after conv and silu -> (delta (..., e), B (..., n), C (..., n))."""
        c = self.config
        if not c.selective:
            shape = x.shape[:-1]
            delta = jnp.broadcast_to(self.lti_dt[...], (*shape, c.d_inner)).astype(x.dtype)
            B = jnp.broadcast_to(self.lti_B[...], (*shape, c.d_state)).astype(x.dtype)
            C = jnp.broadcast_to(self.lti_C[...], (*shape, c.d_state)).astype(x.dtype)
            return delta, B, C
        # Named for the training step's rematerialisation policy (model.REMAT_SAVED).
        x_dbl = checkpoint_name(self.x_proj(x), "x_dbl")  # (..., r + 2n)
        dt, B, C = jnp.split(x_dbl, [c.dt_rank, c.dt_rank + c.d_state], axis=-1)
        # The dt bias is added inside the scan (with the softplus), as in the official kernel.
        delta = dt @ self.dt_proj.kernel[...].astype(x.dtype)  # (..., e)
        return delta, B, C

    def _in_proj_halves(self, hidden):
        """in_proj as two matmuls, hidden (b, l, d) -> x, z (b, l, e): the same products as one
        (d, 2e) matmul, but z comes out contiguous (the scan kernel would otherwise take a copy
        of the (b, l, 2e) output's second half) and the backward needs no concatenation."""
        kernel = self.in_proj.kernel[...].astype(self.dtype)  # (d, 2e)
        e = kernel.shape[1] // 2
        halves = []
        for i, name in enumerate(("mixer_x", "mixer_z")):
            h = jnp.dot(hidden.astype(self.dtype), kernel[:, i * e : (i + 1) * e])  # (b, l, e)
            if self.in_proj.bias is not None:
                h = h + self.in_proj.bias[...][i * e : (i + 1) * e].astype(self.dtype)
            halves.append(checkpoint_name(h, name))
        return halves

    def scan_inputs(
        self, hidden, conv_state=None, *, step=False, segment_ids=None, padding_mask=None
    ):
        """The selective scan's inputs from the normalised block input (paper Algorithm 2, 1-5).

        hidden: (b, l, d), or (b, d) one token with step=True; conv_state: the last w - 1 conv
        inputs (b, w - 1, e) or None (zeros). Returns (u, delta, B, C, z, conv_state): u, delta,
        z (..., e) with u after the causal conv and silu, delta before its bias and softplus,
        B, C (..., n), and the updated conv state. segment_ids (b, l) int keeps the causal conv
        inside each packed segment. padding_mask (b, l) bool (True at real tokens; left or right
        padding, `MambaLM` checks the pattern): a padded position feeds zeros to the conv, gets
        delta = PAD_DELTA so that the scan leaves the state unchanged there, and the conv state
        returned is the one after the row's last real token."""
        if step:
            xz = self.in_proj(hidden)  # (..., 2e)
            x, z = jnp.split(xz, 2, axis=-1)  # (..., e) each
            u, conv_state = self.conv1d.step(x, conv_state, silu=True)
            delta, B, C = self._ssm_inputs(u)
            return u, delta, B, C, z, conv_state
        x, z = self._in_proj_halves(hidden)  # (b, l, e) each
        if padding_mask is not None:
            x = jnp.where(padding_mask[..., None], x, jnp.zeros((), x.dtype))
        mask = None
        if segment_ids is not None:
            mask = conv_segment_mask(segment_ids, self.config.d_conv)  # (b, l, w)
        u, new_state = self.conv1d(x, conv_state, silu=True, mask=mask)
        if padding_mask is not None or segment_ids is not None:
            # The window after the last real token, holding only its segment's inputs.
            last = None
            if padding_mask is not None:
                positions = jnp.arange(x.shape[1], dtype=jnp.int32)
                last = jnp.max(jnp.where(padding_mask, positions, -1), axis=1)  # (b,)
            new_state = conv_tail(x, conv_state, self.config.d_conv, last, segment_ids)
        delta, B, C = self._ssm_inputs(u)
        if padding_mask is not None:
            delta = jnp.where(padding_mask[..., None], delta, jnp.asarray(PAD_DELTA, delta.dtype))
        return u, delta, B, C, z, new_state

    def A(self):
        """A = -exp(A_log): (e, n) float32, negative (S4D-Real)."""
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    def __call__(self, hidden, cache=None, segment_ids=None, padding_mask=None):
        """hidden: (b, l, d). cache: None or (conv (b, w - 1, e), ssm (b, e, n)). segment_ids:
        (b, l) int or None; packed documents, the conv and the scan restart at each new id.
        padding_mask: (b, l) bool or None (True at real tokens; see `scan_inputs`).

        Returns out (b, l, d), and the updated cache when one was given."""
        c = self.config
        conv_state, ssm_state = cache if cache is not None else (None, None)
        x, delta, B, C, z, conv_state = self.scan_inputs(
            hidden, conv_state, segment_ids=segment_ids, padding_mask=padding_mask
        )
        A = self.A()  # (e, n)
        y, ssm_state = selective_scan(
            x, delta, A, B, C, self.D[...], z, self.dt_proj.bias[...],
            delta_softplus=True, initial_state=ssm_state, return_final_state=True,
            segment_ids=segment_ids, impl=c.scan_impl,
        )  # fmt: skip
        out = self.out_proj(checkpoint_name(y, "mixer_y"))  # (b, l, d)
        if cache is None:
            return out
        return out, (conv_state, ssm_state)

    def step(self, hidden, cache, A=None):
        """hidden: (b, d) one token; cache: (conv (b, w - 1, e), ssm (b, e, n)). Returns (out (b, d), cache).

        A: (e, n) float32, `self.A()` computed once ahead (a decoding loop passes it so that no
        token recomputes it), or None to compute it here."""
        conv_state, ssm_state = cache
        x, delta, B, C, z, conv_state = self.scan_inputs(hidden, conv_state, step=True)
        y, ssm_state = selective_scan_step(
            x, delta, self.A() if A is None else A, B, C, self.D[...], z, self.dt_proj.bias[...],
            state=ssm_state, delta_softplus=True,
        )  # fmt: skip
        return self.out_proj(y), (conv_state, ssm_state)

    def init_cache(self, batch_size: int):
        c = self.config
        conv = jnp.zeros((batch_size, c.d_conv - 1, c.d_inner), jnp.dtype(c.dtype))
        ssm = jnp.zeros((batch_size, c.d_inner, c.d_state), jnp.float32)
        return conv, ssm
