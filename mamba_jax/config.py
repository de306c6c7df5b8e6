"""The model's configuration (`MambaConfig`) and the device mesh's (`MeshConfig`), both frozen.

Derived sizes are properties, so a config is never mutated after construction. The run's
configuration (data, optimisation, checkpoints, launch) is `mamba_jax.training.run_config`.
"""

from __future__ import annotations

import dataclasses
import math

SCAN_IMPLS = ("auto", "reference", "associative", "pallas", "triton")
CONV_IMPLS = ("auto", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Sizes of a Mamba-1 language model (paper section 3.4, official code defaults)."""

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank_: int | None = None  # None means ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    pad_vocab_size_multiple: int = 8
    norm_eps: float = 1e-5
    conv_bias: bool = True
    bias: bool = False
    rescale_prenorm_residual: bool = True
    scan_impl: str = "auto"
    # The causal conv + SiLU: "pallas" (pallas_kernels.causal_conv, a Triton kernel on NVIDIA
    # GPUs), "xla" (jnp ops), or "auto" (pallas where it runs, else xla). Packed rows (segment
    # ids) always take the xla path.
    conv_impl: str = "auto"
    remat: bool = False
    # With remat, also keep the scan's output and the fused kernel's state checkpoints (about
    # 2 + 8 bytes per token and channel per layer at d_state 16): the backward then runs no
    # second forward kernel. Faster where the memory is there (the 130m preset on one H200).
    remat_keep_scan: bool = False
    # Apply the layers with `nnx.scan` (one compiled block, whatever the depth). False unrolls
    # them in the program: longer compiles, but each layer's saved activations are buffers of
    # their own, where a scan copies them into stacked (n_layer, ...) buffers and back.
    scan_layers: bool = True
    # With remat_keep_scan and scan_layers=False: only the first this many layers keep the scan
    # (None: all), to spend a memory budget on part of the stack.
    remat_keep_scan_layers: int | None = None
    # Ablation (paper Table 1): delta, B and C do not depend on the input (an LTI, S4-like layer).
    selective: bool = True
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if self.dt_rank_ is not None and self.dt_rank_ < 1:
            raise ValueError(f"MambaConfig.dt_rank_ must be positive or None, got {self.dt_rank_}")
        if self.scan_impl not in SCAN_IMPLS:
            raise ValueError(
                f"MambaConfig.scan_impl must be one of {SCAN_IMPLS}, got {self.scan_impl!r}"
            )
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(
                f"MambaConfig.conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"MambaConfig.{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}"
                )
        k = self.remat_keep_scan_layers
        if k is not None:
            if not isinstance(k, int) or not 0 <= k <= self.n_layer:
                raise ValueError(f"MambaConfig.remat_keep_scan_layers must be None or an int in "
                                 f"[0, n_layer={self.n_layer}], got {k!r}")  # fmt: skip
            if self.scan_layers and k not in (0, self.n_layer):
                raise ValueError("MambaConfig.remat_keep_scan_layers below n_layer needs "
                                 "scan_layers=False (a scan runs one policy for every layer)")  # fmt: skip
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min=} {self.dt_max=}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return self.dt_rank_ if self.dt_rank_ is not None else math.ceil(self.d_model / 16)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def replace(self, **kwargs) -> MambaConfig:
        return dataclasses.replace(self, **kwargs)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes along ("data", "fsdp", "tensor", "sequence"); one may be -1 (fill).

    sequence > 1 splits the length of every sequence over that many devices (context
    parallelism, for sequences too long for one device); train.seq_len must be a multiple."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor, self.sequence)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(
                f"mesh sizes must be positive with at most one -1 (fill), got "
                f"data={self.data} fsdp={self.fsdp} tensor={self.tensor} sequence={self.sequence}"
            )
