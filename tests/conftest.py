"""Shared test setup: fake CPU devices, the tolerance table, and the gpu marker."""

import os

# Eight fake CPU devices let the sharding tests build real meshes on one machine.
# This must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One table, per input dtype: (rtol, atol) for comparing a fast path against the fp32 reference.
# bf16/fp16 entries cover inputs rounded to 8/11 mantissa bits before the fp32 scan.
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=2e-4, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=3e-2, atol=3e-2),
    jnp.dtype(jnp.float16): dict(rtol=5e-3, atol=5e-3),
}
# Gradients sum over length and batch, so they accumulate more rounding than outputs.
GRAD_TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=1e-3, atol=1e-4),
    jnp.dtype(jnp.bfloat16): dict(rtol=5e-2, atol=5e-2),
    jnp.dtype(jnp.float16): dict(rtol=1e-2, atol=1e-2),
}


def tolerance(dtype, grad=False):
    table = GRAD_TOLERANCES if grad else TOLERANCES
    return table[jnp.dtype(dtype)]


def _assert_close(actual, expected, dtype=jnp.float32, grad=False, err_msg=""):
    """Compare in fp32, scaling atol by the reference's magnitude so large sums are judged fairly."""
    tol = tolerance(dtype, grad)
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{err_msg} shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{err_msg} non-finite values"
    scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    np.testing.assert_allclose(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=err_msg)


@pytest.fixture
def assert_close():
    return _assert_close


def gpu_available() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
