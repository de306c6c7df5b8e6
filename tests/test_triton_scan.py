"""The Triton selective-scan kernels (pallas_kernels.triton_scan) against the fp32 reference.

On CPU: argument checks, the support query, and (when triton is installed) the kernels themselves
in Triton's interpreter at tiny sizes. Marked gpu: the compiled kernels through jax-triton on an
NVIDIA GPU at awkward sizes, and bitwise-deterministic gradients.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.scan import selective_scan
from pallas_kernels import triton_scan as ts
from tests.conftest import SCAN_ARG_NAMES as ARG_NAMES
from tests.conftest import make_scan_args as make_args
from tests.conftest import segment_ids_from_starts  # noqa: F401 - the interpreter script uses it

ROOT = pathlib.Path(__file__).resolve().parents[1]


def outputs_and_grads(fn, args, seed=0):
    """(y, final state, gradients of every non-None argument) of a cotangent-weighted loss."""
    names = [k for k in ARG_NAMES if args[k] is not None]
    xs = [args[k] for k in names]

    def call(*xs):
        kw = dict(zip(names, xs, strict=True))
        return fn(**{k: kw.get(k) for k in ARG_NAMES})

    y, h = jax.jit(call)(*xs)
    ky, kh = jax.random.split(jax.random.key(seed + 100))
    gy = jax.random.normal(ky, y.shape, jnp.float32)
    gh = jax.random.normal(kh, h.shape, jnp.float32)

    def loss(*xs):
        y, h = call(*xs)
        return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(h * gh)

    grads = jax.jit(jax.grad(loss, tuple(range(len(xs)))))(*xs)
    return y, h, dict(zip(names, grads, strict=True))


def triton_fn(softplus, segment_ids=None, block_sizes=None, interpret=False):
    return functools.partial(
        ts.selective_scan_triton, delta_softplus=softplus, segment_ids=segment_ids,
        block_sizes=block_sizes, interpret=interpret,
    )  # fmt: skip


def reference_fn(softplus, segment_ids=None):
    return functools.partial(
        selective_scan, delta_softplus=softplus, segment_ids=segment_ids,
        return_final_state=True, impl="reference",
    )  # fmt: skip


def check_against_reference(args, softplus, assert_close, segment_ids=None, block_sizes=None):
    dtype = args["u"].dtype
    y, h, grads = outputs_and_grads(triton_fn(softplus, segment_ids, block_sizes), args)
    y_ref, h_ref, grads_ref = outputs_and_grads(reference_fn(softplus, segment_ids), args)
    assert y.dtype == dtype and h.dtype == jnp.float32
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(h, h_ref, jnp.float32 if dtype == jnp.float32 else dtype, err_msg="final state")
    for name, g_ref in grads_ref.items():
        g = grads[name]
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype, grad=True, err_msg=f"d{name}")


# ----------------------------------------------------------------------------------------------
# CPU: interface.


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(u=jnp.zeros((1, 4))), "u must have shape"),
        (dict(delta=jnp.zeros((1, 5, 8))), "delta"),
        (dict(A=jnp.zeros((9, 4))), "A"),
        (dict(B=jnp.zeros((1, 4, 5))), "B"),
        (dict(C=jnp.zeros((1, 4, 3, 4))), "C"),
        (dict(B=jnp.zeros((1, 4, 3, 4)), C=jnp.zeros((1, 4, 3, 4))), "groups"),
        (dict(D=jnp.zeros((7,))), "D"),
        (dict(z=jnp.zeros((1, 4, 8), jnp.int32)), "z"),
        (dict(initial_state=jnp.zeros((1, 8, 5))), "initial_state"),
        (dict(delta_bias=jnp.zeros((8,), jnp.int32)), "delta_bias"),
        (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), r"segment_ids must have shape \(b, l\)"),
        (dict(segment_ids=jnp.zeros((1, 4), jnp.float32)), "segment_ids must have an integer"),
        (dict(segment_ids=[[0, 0, 1, 1]]), "segment_ids must be an array"),
        (dict(block_sizes=dict(chunk=16)), "block_sizes must be a TritonBlockSizes"),
    ],
)
def test_validation_names_argument(bad, match):
    args = {**make_args(0, 1, 4, 8, 4, 0, jnp.float32), **bad}
    with pytest.raises(ValueError, match=match):
        ts.selective_scan_triton(**args)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="chunk"):
        ts.TritonBlockSizes(chunk=12)
    with pytest.raises(ValueError, match="bwd_channels"):
        ts.TritonBlockSizes(bwd_channels=1)
    with pytest.raises(ValueError, match="fwd_warps"):
        ts.TritonBlockSizes(fwd_warps=3)
    with pytest.raises(ValueError, match="target_warps"):
        ts.TritonBlockSizes(target_warps=0)
    with pytest.raises(ValueError, match="bwd_sum_lanes"):
        ts.TritonBlockSizes(bwd_sum_lanes=3)
    with pytest.raises(ValueError, match="fwd_warps_per_sm"):
        ts.TritonBlockSizes(fwd_warps_per_sm=0)
    with pytest.raises(ValueError, match="bwd_warps_per_sm"):
        ts.TritonBlockSizes(bwd_warps_per_sm=65)
    with pytest.raises(ValueError, match="bwd_scatter"):
        ts.TritonBlockSizes(bwd_scatter=True, bwd_sum_lanes=8)


def test_bwd_scatter_plan():
    """The halving sum runs log2 of min(state rows, channels, 32) rounds; off by default."""
    kw = dict(softplus=True, has_z=True, has_seg=False, interpret=False)
    on = ts.TritonBlockSizes(bwd_scatter=True)
    assert ts.make_plan(8, 2048, 1536, 16, 1, ts.TritonBlockSizes(), **kw).bwd_scatter == 0
    assert ts.make_plan(8, 2048, 1536, 16, 1, on, **kw).bwd_scatter == 4  # 16 rows
    assert ts.make_plan(8, 2048, 1536, 64, 1, on, **kw).bwd_scatter == 5  # 32 lanes
    assert ts.make_plan(8, 2048, 1536, 256, 1, on, **kw).bwd_scatter == 3  # 8-channel programs
    assert ts.make_plan(1, 9, 40, 3, 1, on, **kw).bwd_scatter == 2  # 4 rows


def test_bwd_sum_lanes_plan():
    """The dB / dC partials sum over bwd_sum_lanes channels, at most a program's channels."""
    kw = dict(softplus=True, has_z=True, has_seg=False, interpret=False)
    default = ts.make_plan(8, 2048, 1536, 16, 1, ts.TritonBlockSizes(), **kw)
    assert default.bwd_sum_lanes == default.bwd_channels == 32
    eight = ts.make_plan(8, 2048, 1536, 16, 1, ts.TritonBlockSizes(bwd_sum_lanes=8), **kw)
    assert eight.bwd_sum_lanes == 8
    capped = ts.make_plan(8, 2048, 1536, 16, 1,
                          ts.TritonBlockSizes(bwd_channels=16, bwd_sum_lanes=64), **kw)  # fmt: skip
    assert capped.bwd_sum_lanes == 16


def test_unsupported_reason_sizes():
    kw = dict(batch=2, length=64, d=256, n=16, groups=1, dtype=jnp.bfloat16)
    assert "d_state" in ts.triton_unsupported_reason(**{**kw, "n": 257})
    assert "groups" in ts.triton_unsupported_reason(**{**kw, "groups": 3})
    assert "dtype" in ts.triton_unsupported_reason(**{**kw, "dtype": jnp.int32})
    assert ts.triton_unsupported_reason(**{**kw, "batch": 0}) is not None


def test_unsupported_reason_without_triton(monkeypatch):
    kw = dict(batch=2, length=64, d=256, n=16, groups=1, dtype=jnp.bfloat16)
    monkeypatch.setitem(sys.modules, "jax_triton", None)  # import now raises ImportError
    reason = ts.triton_unsupported_reason(**kw, backend="gpu")
    assert reason is not None and "not installed" in reason
    monkeypatch.setitem(sys.modules, "triton", None)
    assert "triton is not installed" in ts.triton_unsupported_reason(**kw, backend="gpu")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_refuses_cpu_backend():
    kw = dict(batch=2, length=64, d=256, n=16, groups=1, dtype=jnp.float32)
    reason = ts.triton_unsupported_reason(**kw)
    assert reason is not None and "\n" not in reason
    if importlib.util.find_spec("jax_triton") and importlib.util.find_spec("triton"):
        assert "GPU backend" in reason
    with pytest.raises(ValueError, match="selective_scan_triton cannot run this call"):
        ts.selective_scan_triton(**make_args(0, 1, 4, 8, 4, 0, jnp.float32))


def test_import_needs_no_triton():
    code = (
        "import sys; import pallas_kernels.triton_scan as t; "
        "assert 'triton' not in sys.modules and 'jax_triton' not in sys.modules, "
        "sorted(m for m in sys.modules if 'triton' in m)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "b, e, length, fwd_splits, bwd_splits, old_splits",
    [
        (8, 1536, 2048, 4, 8, 6),
        (4, 4096, 2048, 3, 2, 5),
        (2, 2048, 16384, 12, 8, 17),
        (1, 1536, 131072, 33, 22, 44),
    ],
)
def test_default_plan(b, e, length, fwd_splits, bwd_splits, old_splits):
    """S1-S4 at n 16 on 132 SMs: below MIN_PROGRAMS warps the sequence is split so that the
    programs fill whole waves (12 forward and 8 backward warps per SM); target_warps keeps the
    earlier rule (towards 2112 warps)."""
    kw = dict(softplus=True, has_z=True, has_seg=False, interpret=False, num_sms=132)
    plan = ts.make_plan(b, length, e, 16, 1, ts.TritonBlockSizes(), **kw)
    fwd, bwd = plan.n_splits(plan.fwd_split, fwd=True), plan.n_splits(plan.bwd_split)
    assert (fwd, bwd) == (fwd_splits, bwd_splits)
    assert plan.n_chunks * plan.chunk >= length
    warps = b * e // 32
    # S1-S3: the forward fills one wave of 132 x 12 warps to within 4%, without going over.
    assert 0.96 * 132 * ts.FWD_WARPS_PER_SM <= warps * fwd <= 132 * ts.FWD_WARPS_PER_SM
    # No other split count runs fewer waves per chunk (within the rule's 3% tie margin).
    for s in range(1, plan.n_chunks // 8 + 1):
        cps = -(-plan.n_chunks // s)
        ns = -(-plan.n_chunks // cps)
        cost = -(-warps * ns // (132 * ts.BWD_WARPS_PER_SM)) * cps * (1.3 if ns > 1 else 1.0)
        best = -(-warps * bwd // (132 * ts.BWD_WARPS_PER_SM)) * plan.bwd_split * 1.3
        assert best <= 1.03 * cost, (s, cost, best)
    old = ts.make_plan(b, length, e, 16, 1, ts.TritonBlockSizes(target_warps=2112), **kw)
    assert old.n_splits(old.bwd_split) == old_splits
    # The GPU's size is an input: 58 SMs hold 696 forward warps at once.
    small = ts.make_plan(b, length, e, 16, 1, ts.TritonBlockSizes(), **{**kw, "num_sms": 58})
    assert small.fwd_split == ts._split_for_waves(
        warps, plan.fwd_chunks, plan.fwd_chunks // 8, 58 * ts.FWD_WARPS_PER_SM, ts.FWD_LOCAL_COST
    )
    for n in (1, 3, 64, 256):
        p = ts.make_plan(b, length, e, n, 1, ts.TritonBlockSizes(), **kw)
        assert p.n_pad >= n and p.fwd_channels * p.n_pad * p.chunk <= 8192


def test_split_for_waves():
    """The rule on its own: 384 warps, 512 chunks, 1056 warps at once: 8 splits (3 waves of 64
    chunks) beat 2 (one wave of 256) and 11 (4 waves of 47) is within the 3% margin."""
    assert ts._split_for_waves(384, 512, 64, 1056, 0.3) == 64
    # Enough warps for a wave already: a split only adds the local pass.
    assert ts._split_for_waves(2000, 512, 64, 1056, 0.3) == 512
    assert ts._split_for_waves(10, 3, 1, 1056, 0.3) == 3


# ----------------------------------------------------------------------------------------------
# CPU: the kernels in Triton's interpreter (needs triton; runs in a subprocess, because
# TRITON_INTERPRET must be set before the kernels are defined).

INTERPRET_CASES = [
    # dtype, b, L, e, n, groups, z/D/bias/h0, softplus, segment starts per row, block sizes
    ("float32", 1, 11, 6, 3, 0, True, True, None,
     dict(chunk=4, fwd_channels=4, bwd_channels=4, min_programs=64, min_split_chunks=1)),
    ("float32", 2, 13, 6, 5, 2, True, True, [[1, 4, 8, 12], [5]],
     dict(chunk=4, fwd_channels=2, bwd_channels=4, min_programs=64, min_split_chunks=1)),
    ("float16", 1, 9, 4, 1, 0, False, False, None, dict(chunk=4, min_programs=1)),
    ("bfloat16", 2, 1, 4, 3, 1, True, True, None, dict(chunk=2)),
    ("float32", 1, 7, 5, 2, 0, True, True, [[0, 3, 6]], dict(chunk=4)),
    # Forward chunks of 8 holding four checkpoints each, split forward and backward, segments.
    ("float32", 2, 37, 6, 3, 2, True, True, [[1, 4, 8, 12], [5]],
     dict(chunk=2, fwd_chunk=8, min_programs=64, min_split_chunks=1)),
    # dB / dC partial sums over 2 and 1 channels of a 4-channel program, grouped, split.
    ("float32", 2, 13, 6, 5, 2, True, True, [[1, 4, 8, 12], [5]],
     dict(chunk=4, bwd_channels=4, bwd_sum_lanes=2, min_programs=64, min_split_chunks=1)),
    ("bfloat16", 1, 9, 5, 3, 0, True, True, None, dict(chunk=4, bwd_channels=4, bwd_sum_lanes=1)),
    # dB / dC summed by halving: 2 rounds over 8 state rows (2 rows left per channel), grouped,
    # split, segments; then 2 rounds over 4 rows and a plain sum over the other 8 channel groups
    # of a 32-channel program (two programs, the second mostly padding).
    ("float32", 2, 13, 6, 5, 2, True, True, [[1, 4, 8, 12], [5]],
     dict(chunk=4, bwd_channels=4, bwd_scatter=True, min_programs=64, min_split_chunks=1)),
    ("bfloat16", 1, 9, 40, 3, 0, True, True, None, dict(chunk=4, bwd_scatter=True)),
]  # fmt: skip

_INTERPRET_SCRIPT = """
import json, sys
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, {tests!r})
jax.config.update("jax_default_matmul_precision", "highest")
import test_triton_scan as t
cases = json.loads({cases!r})
for i, (dtype, b, L, e, n, g, opts, softplus, starts, bs) in enumerate(cases):
    args = t.make_args(i, b, L, e, n, g, jnp.dtype(dtype), z=opts, D=opts, bias=opts, h0=opts,
                       softplus=softplus)
    seg = None if starts is None else t.segment_ids_from_starts(L, *starts)
    fast = t.triton_fn(softplus, seg, t.ts.TritonBlockSizes(**bs), interpret=True)
    out = {{}}
    for tag, fn in (("kernel", fast), ("reference", t.reference_fn(softplus, seg))):
        y, h, grads = t.outputs_and_grads(fn, args)
        out.update({{f"{{tag}}/y": y, f"{{tag}}/h": h}})
        out.update({{f"{{tag}}/d{{k}}": v for k, v in grads.items()}})
    np.savez({out!r} + f"/case{{i}}.npz",
             **{{k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in out.items()}})
"""


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (for its interpreter)"
)
def test_interpreter_matches_reference(tmp_path, assert_close):
    script = _INTERPRET_SCRIPT.format(
        tests=str(ROOT / "tests"), cases=json.dumps(INTERPRET_CASES), out=str(tmp_path)
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for i, case in enumerate(INTERPRET_CASES):
        dtype = jnp.dtype(case[0])
        data = np.load(tmp_path / f"case{i}.npz")
        keys = [k.split("/", 1)[1] for k in data.files if k.startswith("reference/")]
        assert {"y", "h", "du", "ddelta", "dA", "dB", "dC"} <= set(keys)
        for key in keys:
            grad = key not in ("y", "h")
            tol_dtype = jnp.float32 if key == "h" and dtype == jnp.float32 else dtype
            assert_close(data[f"kernel/{key}"], data[f"reference/{key}"], tol_dtype, grad=grad,
                         err_msg=f"case {i} {key}")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Compiled on an NVIDIA GPU through jax-triton.


def _skip_unless_supported(b, length, e, n, groups, dtype):
    reason = ts.triton_unsupported_reason(
        batch=b, length=length, d=e, n=n, groups=max(groups, 1), dtype=dtype
    )
    if reason is not None:
        pytest.skip(reason)


GPU_CASES = [
    # dtype, b, L, e, n, groups, z/D/bias/h0, softplus, block sizes
    (jnp.bfloat16, 2, 1000, 384, 16, 0, True, True, None),
    (jnp.float32, 1, 777, 200, 16, 0, True, True, None),
    (jnp.float16, 3, 129, 256, 16, 2, False, False, None),
    (jnp.float32, 2, 1, 200, 3, 0, True, True, None),
    (jnp.bfloat16, 1, 300, 200, 3, 2, True, True, None),
    (jnp.float32, 2, 257, 128, 64, 0, True, True, None),
    (jnp.bfloat16, 1, 64, 160, 1, 0, True, False, None),
    (jnp.float32, 1, 70, 128, 256, 0, True, True, None),
    (jnp.float16, 1, 777, 200, 16, 2, True, True, None),
    # Sequence splits in forward and backward (few programs).
    (jnp.float32, 1, 777, 200, 16, 0, True, True, ts.TritonBlockSizes(min_split_chunks=2)),
    (jnp.bfloat16, 1, 2000, 64, 16, 2, True, False,
     ts.TritonBlockSizes(chunk=32, fwd_channels=16, bwd_channels=8, min_split_chunks=4)),
    # dB / dC partials over 8 channels, at an odd width and length.
    (jnp.bfloat16, 2, 1001, 200, 16, 2, True, True, ts.TritonBlockSizes(bwd_sum_lanes=8)),
    # dB / dC summed by halving: 4 rounds + a plain sum (n 16), 5 rounds leaving 2 rows per lane
    # (n 64), 3 rounds over 8-channel programs (n 256).
    (jnp.bfloat16, 2, 1001, 200, 16, 2, True, True, ts.TritonBlockSizes(bwd_scatter=True)),
    (jnp.float32, 2, 257, 128, 64, 0, True, True, ts.TritonBlockSizes(bwd_scatter=True)),
    (jnp.float32, 1, 70, 128, 256, 0, True, True, ts.TritonBlockSizes(bwd_scatter=True)),
]  # fmt: skip


def _block_sizes_id(bs):
    """The block sizes that differ from the defaults, e.g. "-bwd_scatter=True"."""
    if bs is None:
        return ""
    default = ts.TritonBlockSizes()
    changed = [f"{f.name}={getattr(bs, f.name)}" for f in dataclasses.fields(bs)
               if getattr(bs, f.name) != getattr(default, f.name)]  # fmt: skip
    return "-" + ",".join(changed)


def _gpu_case_id(c):
    return (
        f"{jnp.dtype(c[0]).name}-b{c[1]}-L{c[2]}-e{c[3]}-n{c[4]}-g{c[5]}-opt{c[6]}-sp{c[7]}"
        + _block_sizes_id(c[8])
    )


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_gpu_case_id)
def test_gpu_matches_reference(case, assert_close):
    dtype, b, length, e, n, groups, opts, softplus, bs = case
    _skip_unless_supported(b, length, e, n, groups, dtype)
    args = make_args(3, b, length, e, n, groups, dtype, z=opts, D=opts, bias=opts, h0=opts,
                     softplus=softplus)  # fmt: skip
    check_against_reference(args, softplus, assert_close, block_sizes=bs)


GPU_SEGMENT_CASES = [
    # dtype, b, L, e, n, groups, block sizes
    (jnp.bfloat16, 2, 1000, 384, 16, 0, None),
    (jnp.float32, 2, 777, 200, 16, 2, None),
    (jnp.float16, 3, 129, 256, 3, 0, None),
    (jnp.float32, 2, 257, 128, 64, 0, None),
    (jnp.float32, 1, 777, 200, 16, 0, ts.TritonBlockSizes(min_split_chunks=2)),
]


def random_segment_ids(seed, b, length):
    """(b, l) int32: random starts (1 in 40); in row 0 one-token segments at position 0 and at
    the last position and starts at 16 and 17 (a chunk boundary); the last row (b > 1) is one
    segment."""
    rng = np.random.default_rng(seed)
    starts = rng.random((b, length)) < 1 / 40
    starts[0, [1, length - 1]] = True
    starts[0, 16:18] = length > 17
    starts[:, 0] = False
    if b > 1:
        starts[-1] = False
    return jnp.asarray(np.cumsum(starts, axis=1, dtype=np.int32))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", GPU_SEGMENT_CASES, ids=lambda c: _gpu_case_id((*c[:6], 1, 1, c[6]))
)
def test_gpu_segments_match_reference(case, assert_close):
    dtype, b, length, e, n, groups, bs = case
    _skip_unless_supported(b, length, e, n, groups, dtype)
    args = make_args(6, b, length, e, n, groups, dtype)
    seg = random_segment_ids(7, b, length)
    check_against_reference(args, True, assert_close, segment_ids=seg, block_sizes=bs)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bs", [None, ts.TritonBlockSizes(min_split_chunks=2)], ids=["plain", "split"]
)
def test_gpu_gradients_are_deterministic(bs):
    _skip_unless_supported(2, 2048, 512, 16, 0, jnp.bfloat16)
    args = make_args(4, 2, 2048, 512, 16, 0, jnp.bfloat16)
    seg = random_segment_ids(5, 2, 2048)
    f = triton_fn(True, seg, bs)

    @jax.jit
    def grads(*xs):
        def loss(*a):
            y, h = f(*a[:8], initial_state=a[8])
            return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h**2)

        return jax.grad(loss, range(9))(*xs)

    xs = [args[k] for k in ARG_NAMES]
    first, second = grads(*xs), grads(*xs)
    for name, a, b in zip(ARG_NAMES, first, second, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU dispatch")
def test_dispatcher_on_cpu():
    """impl="triton" is refused with the kernel's reason; "auto" falls back to associative."""
    from mamba_jax.scan import resolve_impl

    assert resolve_impl("auto", 2, 64, 32, 16, 1, jnp.float32) == "associative"
    with pytest.raises(ValueError, match="impl='triton' is not supported for this call"):
        resolve_impl("triton", 2, 64, 32, 16, 1, jnp.float32)
    args = make_args(0, 1, 8, 4, 2, 0, jnp.float32)
    with pytest.raises(ValueError, match="impl='triton' is not supported"):
        selective_scan(**args, delta_softplus=True, impl="triton")
