"""Argument checks shared by the GPU and TPU kernels: one clear ValueError per bad argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Every kernel's forward tags the state checkpoints it saves for its backward with this name, so a
# rematerialisation policy (jax.checkpoint_policies.save_only_these_names) can keep them and
# skip a second forward kernel in the backward (mamba_jax.model, MambaConfig.remat_keep_scan).
SCAN_CHECKPOINTS = "scan_checkpoints"


def name_checkpoints(tree):
    """`tree` with every array tagged SCAN_CHECKPOINTS (None leaves stay None)."""
    return jax.tree.map(lambda x: checkpoint_name(x, SCAN_CHECKPOINTS), tree)


def check_array(name, x, shape, meaning, dtypes=DTYPES):
    """A clear ValueError unless x is an array of `shape` (read as `meaning`) and a float dtype."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {meaning}={tuple(shape)}, got {tuple(x.shape)}")
    if not any(x.dtype == jnp.dtype(t) for t in dtypes):
        names = ", ".join(jnp.dtype(t).name for t in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")


def validate_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Checks every array argument of a kernel scan; returns (b, l, e, n, g)."""
    if not hasattr(u, "ndim") or u.ndim != 3:
        raise ValueError(f"u must have shape (b, l, e), got {getattr(u, 'shape', type(u))}")
    b, length, e = u.shape
    check_array("u", u, u.shape, "(b, l, e)")
    check_array("delta", delta, (b, length, e), "(b, l, e)")
    if not hasattr(A, "ndim") or A.ndim != 2 or A.shape[0] != e:
        raise ValueError(f"A must have shape (e, n) with e={e}, got {getattr(A, 'shape', A)}")
    n = A.shape[1]
    check_array("A", A, (e, n), "(e, n)")
    if not hasattr(B, "ndim") or B.ndim not in (3, 4):
        raise ValueError(
            f"B must have shape (b, l, n) or (b, l, g, n), got {getattr(B, 'shape', B)}"
        )
    g = 1 if B.ndim == 3 else B.shape[2]
    shape_bc = (b, length, n) if B.ndim == 3 else (b, length, g, n)
    meaning = "(b, l, n)" if B.ndim == 3 else "(b, l, g, n)"
    check_array("B", B, shape_bc, meaning)
    check_array("C", C, shape_bc, meaning)
    if g < 1 or e % g:
        raise ValueError(f"B/C groups g={g} must divide e={e}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            check_array(name, x, (e,), "(e,)")
    if z is not None:
        check_array("z", z, (b, length, e), "(b, l, e)")
    if initial_state is not None:
        check_array("initial_state", initial_state, (b, e, n), "(b, e, n)")
    return b, length, e, n, g


def validate_segment_ids(segment_ids, b, length):
    """segment_ids must be an integer (b, l) array."""
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        raise ValueError(f"segment_ids must be an array, got {type(segment_ids).__name__}")
    if tuple(segment_ids.shape) != (b, length):
        raise ValueError(
            f"segment_ids must have shape (b, l)={(b, length)}, got {tuple(segment_ids.shape)}"
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")


def size_reason(*, batch, length, d, n, groups, dtype, max_d_state) -> str | None:
    """Why no kernel can take these sizes (dtype, positivity, groups, d_state limit), or None."""
    if not any(jnp.dtype(dtype) == jnp.dtype(t) for t in DTYPES):
        return f"dtype must be float32, bfloat16 or float16, got {jnp.dtype(dtype).name}"
    if min(batch, length, d, n, groups) < 1:
        return f"sizes must be positive, got {batch=} {length=} {d=} {n=} {groups=}"
    if d % groups:
        return f"groups={groups} must divide d={d}"
    if n > max_d_state:
        return f"d_state n={n} is above the kernel's limit of {max_d_state}"
    return None


# The oldest NVIDIA GPUs the Triton kernels run on (Turing).
MIN_COMPUTE_CAPABILITY = (7, 5)


def nvidia_gpu_reason(backend, what: str) -> str | None:
    """None when `what` (a Triton kernel) can run here: a GPU backend whose first device is an
    NVIDIA GPU of compute capability >= 7.5; otherwise why not. backend: the one asked for, or
    None for jax.default_backend()."""
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return f"{what} needs a GPU backend, got {backend!r}"
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError as err:
        return f"no GPU device: {err}"
    kind = getattr(device, "device_kind", "?")
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    if "rocm" in version or "hip" in version:
        return f"{what} targets NVIDIA GPUs, got {kind} ({version})"
    cap = getattr(device, "compute_capability", None)
    if cap is None:
        return f"cannot read the compute capability of {kind}"
    try:
        major_minor = tuple(int(x) for x in str(cap).split(".")[:2])
    except ValueError:
        return f"{what} targets NVIDIA GPUs, got {kind} (compute capability {cap!r})"
    if major_minor < MIN_COMPUTE_CAPABILITY:
        return f"{what} needs compute capability >= 7.5, got {kind} ({cap})"
    return None
