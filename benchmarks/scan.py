"""Selective-scan benchmark: fwd and fwd+bwd milliseconds of ours, beside the rivals, in one record.

    python benchmarks/scan.py                    # pallas, associative: S1-S4 at d_state 16, S1 at 64
    python benchmarks/scan.py --rivals .anchors  # + jla's Mamba-1 kernel and mamba_ssm's CUDA kernel
    python benchmarks/scan.py --shapes S1 --impls pallas --variants 16:4,32:8 --bwd-reduce smem,shuffle
    python benchmarks/scan.py --shapes 2x256x300 --impls associative,reference --no-n64   # CPU
    python benchmarks/scan.py --impls pallas,pallas+segments --no-n64   # the cost of segment_ids
    python benchmarks/scan.py --shapes S1,S2 --impls triton --no-n64 \
        --triton-variants "min_programs=4096 target_warps=2112,fwd_channels=8"

Shapes (b, e, L): S1 8x1536x2048 (130m-class training), S2 4x4096x2048 (1.4b-class training),
S3 2x2048x16384 (long context), S4 1x1536x131072 (very long, batch 1), or any BxExL. bf16 u,
delta, z, B, C; fp32 A, D, delta_bias; delta_softplus; the z gate on; B and C shared by all
channels, (b, l, n). The d_state 64 row repeats the first shape.

Correct before fast: every implementation (ours and the rivals) first runs on fresh random inputs
at (2, min(e, 512), min(L, 1024)), and its y and all eight gradients (the VJP of a random
cotangent) are compared with the fp32 sequential reference, impl="reference", as max |err| / max
|ref| (`rel_err`, `check_ok` when every one is within CHECK_TOL). Then every implementation is
timed the same way: `--inner` calls launched back to back and synchronised once, median over
`--reps` repetitions (dispatch amortised, compilation excluded).

An implementation named `IMPL+segments` runs IMPL with segment_ids (packed rows): documents of
random lengths (mean SEGMENT_MEAN tokens, a fixed pattern) restart the state; it is checked
against the reference given the same segment ids.

Rivals (`--rivals PATH` or $MAMBA_JAX_RIVALS, the folder with their packages and unpack.sh):
jla's Mosaic GPU kernel runs in this process; mamba_ssm's CUDA kernel (`selective_scan_cuda`, a
torch extension) runs in a subprocess of this script (`--cuda-child`, started before JAX takes the
GPU), checked on the same inputs and timed by the same method with torch.cuda.synchronize.

Writes one record (benchmarks/record.py) to benchmarks/results/scan_<date>_<device>.json, then
prints a table, and last each rival's time over ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import re
import statistics
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.record import Record, rivals_dir, run_rival, unpack_rivals  # noqa: E402

SHAPES = {  # name: (b, e, L)
    "S1": (8, 1536, 2048),
    "S2": (4, 4096, 2048),
    "S3": (2, 2048, 16384),
    "S4": (1, 1536, 131072),
}
OURS = ("pallas", "triton", "associative", "reference")
SEGMENTED = "+segments"  # suffix: the implementation with packed-row segment_ids
SEGMENT_MEAN = 512  # mean document length of the segmented rows
RIVALS = ("jla", "mamba_ssm")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "bias")  # selective_scan's argument order
CHECK_TOL = 3e-2  # bf16 outputs: a few bf16 ulps (2^-8) of the largest value
# The associative scan materialises (b, l, e, n) chunk states: above this many it runs out of
# memory on an 80 GB GPU (S4), so it is recorded as not run instead of tried.
ASSOCIATIVE_MAX_ELEMS = 2**31


def parse_shape(text):
    """(name, b, e, L) of "S1".."S4" or "BxExL"."""
    if text in SHAPES:
        return (text, *SHAPES[text])
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not match:
        raise ValueError(f"--shapes entries must be one of {list(SHAPES)} or BxExL, got {text!r}")
    return (text, *map(int, match.groups()))


def check_size(b, e, length):
    return min(b, 2), min(e, 512), min(length, 1024)


def random_inputs(b, e, length, n, seed):
    """Check inputs as float32 numpy arrays, (b, l, ·) layout, plus the cotangent `dy`. The bf16
    ones (u, delta, z, B, C, dy) hold bf16 values exactly, so every process (numpy, JAX, torch)
    gives the kernels the same numbers."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return {
        "u": bf16(normal(b, length, e)),
        "delta": bf16(normal(b, length, e) - 2.0),
        "A": -np.exp(rng.uniform(0.0, np.log(n), (e, n))).astype(np.float32),
        "B": bf16(normal(b, length, n)),
        "C": bf16(normal(b, length, n)),
        "D": normal(e),
        "z": bf16(normal(b, length, e)),
        "bias": rng.uniform(-4.0, -2.0, e).astype(np.float32),
        "dy": bf16(normal(b, length, e)),
    }


def rel_errors(got: dict, ref: dict) -> dict:
    """max |got - ref| / max |ref| per output name ("y", "du", ... "dbias")."""
    out = {}
    for name, r in ref.items():
        r = np.asarray(r, np.float64)
        g = np.asarray(got[name], np.float64).reshape(r.shape)
        out[name] = float(np.max(np.abs(g - r)) / max(float(np.max(np.abs(r))), 1e-30))
    return out


def median_ms(call, sync, inner, reps):
    """`inner` calls back to back, one sync, ms per call; the median over `reps` repetitions."""
    sync(call())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = call()
        sync(out)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# JAX implementations: ours and jla, in this process.


def segment_ids(b, length):
    """(b, length) int32: documents of random lengths (exponential, mean SEGMENT_MEAN), the same
    pattern every call."""
    rng = np.random.default_rng(0)
    starts = rng.random((b, length)) < 1.0 / SEGMENT_MEAN
    return np.cumsum(starts, axis=1, dtype=np.int32)


def jax_scan_fn(impl, block_sizes=None):
    """f(u, delta, A, B, C, D, z, bias) -> y (b, l, e) for one implementation."""
    import pallas_kernels
    from mamba_jax.scan import selective_scan

    if impl.endswith(SEGMENTED):
        base = jax_scan_fn(impl.removesuffix(SEGMENTED), block_sizes)
        return lambda u, *a: base(u, *a, segment_ids=segment_ids(u.shape[0], u.shape[1]))
    if impl == "pallas":
        return lambda *a, **kw: pallas_kernels.selective_scan_pallas(
            *a, delta_softplus=True, block_sizes=block_sizes, **kw
        )[0]
    if impl == "triton" and block_sizes is not None:
        from pallas_kernels import triton_scan

        return lambda *a, **kw: triton_scan.selective_scan_triton(
            *a, delta_softplus=True, block_sizes=block_sizes, **kw
        )[0]
    if impl == "jla":
        from jla.ops.mosaic_gpu import mamba1

        # jla names the arguments as linear attention does: q = C, k = B, v = u, dt = delta.
        return lambda u, delta, A, B, C, D, z, bias: mamba1.mamba1(
            C, B, u, delta, A, d=D, z=z, dt_bias=bias, dt_softplus=True
        )[0]
    return lambda *a, **kw: selective_scan(*a, delta_softplus=True, impl=impl, **kw)


@functools.cache
def jitted(impl, block_sizes=None):
    """(forward, forward + backward) of one implementation, jitted once and used by both the
    check and the timing. The second maps (args, dy) to the eight gradients through jax.vjp."""
    import jax

    f = jax_scan_fn(impl, block_sizes)

    def fwd_bwd(args, dy):
        _, pull = jax.vjp(f, *args)
        return pull(dy)

    return jax.jit(f), jax.jit(fwd_bwd)


def outputs(impl, block_sizes, inputs, dtype):
    """{"y", "du", ..., "dbias"} of one implementation on check inputs; u, delta, z, B, C and dy
    in `dtype`, A, D and bias in float32."""
    import jax.numpy as jnp

    cast = lambda k: dtype if k in ("u", "delta", "B", "C", "z", "dy") else jnp.float32
    args = tuple(jnp.asarray(inputs[k], cast(k)) for k in NAMES)
    fwd, fwd_bwd = jitted(impl, block_sizes)
    grads = fwd_bwd(args, jnp.asarray(inputs["dy"], cast("dy")))
    return {"y": fwd(*args), **{f"d{k}": g for k, g in zip(NAMES, grads, strict=True)}}


@functools.cache
def reference_outputs(size, seed, segmented=False):
    """The fp32 sequential reference on random_inputs(*size, seed) (with segment_ids when
    `segmented`): what every check compares to."""
    import jax.numpy as jnp

    impl = "reference" + (SEGMENTED if segmented else "")
    return outputs(impl, None, random_inputs(*size, seed), jnp.float32)


def device_inputs(b, e, length, n):
    """Full-size timing inputs (u, delta, A, B, C, D, z, bias) and dy, made on the device in one
    compiled call, with random_inputs' distributions."""
    import jax
    import jax.numpy as jnp

    def make(key):
        ks = jax.random.split(key, 9)
        normal = lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16)
        args = (
            normal(ks[0], (b, length, e)),
            (jax.random.normal(ks[1], (b, length, e)) - 2.0).astype(jnp.bfloat16),
            -jnp.exp(jax.random.uniform(ks[2], (e, n), maxval=np.log(n))),
            normal(ks[3], (b, length, n)),
            normal(ks[4], (b, length, n)),
            jax.random.normal(ks[5], (e,)),
            normal(ks[6], (b, length, e)),
            jax.random.uniform(ks[7], (e,), minval=-4.0, maxval=-2.0),
        )
        return args, normal(ks[8], (b, length, e))

    return jax.jit(make)(jax.random.key(0))


def time_jax(impl, block_sizes, b, e, length, n, inner, reps):
    """(fwd_ms, fwd_bwd_ms) on full-size random device inputs."""
    import jax

    args, dy = device_inputs(b, e, length, n)
    fwd, fwd_bwd = jitted(impl, block_sizes)
    sync = jax.block_until_ready
    return (
        median_ms(lambda: fwd(*args), sync, inner, reps),
        median_ms(lambda: fwd_bwd(args, dy), sync, inner, reps),
    )


# ----------------------------------------------------------------------------------------------
# mamba_ssm's CUDA kernel: torch, in a subprocess (`--cuda-child`) that never imports JAX.


def to_channels_first(x, name):
    """Our (b, l, ·) layout to selective_scan_cuda's: (b, e, l) for u, delta, z, dy and
    (b, 1, n, l) (one group) for B and C; A, D, bias are unchanged."""
    if name in ("B", "C"):
        return np.ascontiguousarray(x.transpose(0, 2, 1)[:, None])
    if name in ("u", "delta", "z", "dy"):
        return np.ascontiguousarray(x.transpose(0, 2, 1))
    return x


def from_channels_first(x, name):
    """The inverse of to_channels_first for an output: "y" or a gradient ("du", "dB", ...)."""
    name = name if name == "y" else name[1:]
    if name in ("B", "C"):
        return x[:, 0].transpose(0, 2, 1)
    if name in ("u", "delta", "z", "y"):
        return x.transpose(0, 2, 1)
    return x


CUDA_BF16 = ("u", "delta", "z", "B", "C", "dy")
CUDA_GRADS = (
    "du",
    "ddelta",
    "dA",
    "dB",
    "dC",
    "dD",
    "dbias",
    "dz",
)  # selective_scan_cuda.bwd's order


def cuda_call(ssc, a, dy=None):
    """out_z (b, e, l); given dy, also the eight gradients (one forward and one backward pass)."""
    args = [a[k] for k in NAMES]  # fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out, x, out_z = ssc.fwd(*args, True)
    if dy is None:
        return out_z
    return out_z, ssc.bwd(*args, dy, x, out, None, True, False)


def cuda_check(ssc, torch, size, seed):
    """The kernel's y and gradients on random_inputs(*size, seed), in our layout, as lists."""
    arrays = random_inputs(*size, seed)
    a = {k: torch.from_numpy(to_channels_first(v, k)).cuda() for k, v in arrays.items()}
    a = {k: v.bfloat16() if k in CUDA_BF16 else v for k, v in a.items()}
    y, grads = cuda_call(ssc, a, a.pop("dy"))
    named = {"y": y, **dict(zip(CUDA_GRADS, grads[:8], strict=True))}
    return {k: from_channels_first(v.float().cpu().numpy(), k).tolist() for k, v in named.items()}


def cuda_time(ssc, torch, b, e, length, n, inner, reps):
    """(fwd_ms, fwd_bwd_ms) on random device inputs of the full size, timed as time_jax does."""
    g = torch.Generator(device="cuda").manual_seed(0)
    normal = lambda *shape: torch.randn(*shape, device="cuda", generator=g)
    uniform = lambda *shape: torch.rand(*shape, device="cuda", generator=g)
    a = {
        "u": normal(b, e, length).bfloat16(),
        "delta": (normal(b, e, length) - 2.0).bfloat16(),
        "A": -torch.exp(uniform(e, n) * float(np.log(n))),
        "B": normal(b, 1, n, length).bfloat16(),
        "C": normal(b, 1, n, length).bfloat16(),
        "D": normal(e),
        "z": normal(b, e, length).bfloat16(),
        "bias": uniform(e) * 2.0 - 4.0,
    }
    dy = normal(b, e, length).bfloat16()
    sync = lambda _: torch.cuda.synchronize()
    return (
        median_ms(lambda: cuda_call(ssc, a), sync, inner, reps),
        median_ms(lambda: cuda_call(ssc, a, dy), sync, inner, reps),
    )


def cuda_child(configs, seed, inner, reps):
    """Checks or times selective_scan_cuda for each (b, e, L, n, check); writes
    $OUT/cuda_scan.json. Runs in its own process and never imports JAX."""
    import torch

    sys.path.insert(0, os.path.join(os.environ["MAMBA_EXT"], "built", "ss"))
    import selective_scan_cuda as ssc

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for b, e, length, n, check in configs:
        row = {"size": [b, e, length, n]}
        try:
            if check:
                row["outputs"] = cuda_check(ssc, torch, (b, e, length, n), seed)
            else:
                row["fwd_ms"], row["fwd_bwd_ms"] = cuda_time(
                    ssc, torch, b, e, length, n, inner, reps
                )
        except Exception as err:  # noqa: BLE001 - an unsupported size or out of memory: recorded
            row["error"] = f"{type(err).__name__}: {err}"[:400]
        result["rows"].append(row)
    with open(os.path.join(os.environ["OUT"], "cuda_scan.json"), "w") as f:
        json.dump(result, f)


def run_cuda(rivals, plan, seed, inner, reps):
    """{(b, e, L, n, check): child row} from one --cuda-child subprocess; {"error": ...} rows
    when the child could not run at all."""
    configs = sorted({(*check_size(b, e, length), n, True) for _, b, e, length, n in plan})
    configs += [(b, e, length, n, False) for _, b, e, length, n in plan]
    args = ["--cuda-child", json.dumps(configs), "--seed", seed, "--inner", inner, "--reps", reps]
    out = run_rival(rivals, str(pathlib.Path(__file__).resolve()), args)
    if "error" in out:
        return {tuple(c): {"error": out["error"]} for c in configs}, None
    return {(*row["size"], c[4]): row for c, row in zip(configs, out["rows"], strict=True)}, out


# ----------------------------------------------------------------------------------------------


def parse_variants(text, reduces):
    """[(label, BlockSizes or None)]: block sizes
    tile:sub[:chunks[:target_blocks[:bwd_lanes[:fwd_lanes]]]], each crossed with the bwd_reduce
    methods; [("", None)] (the kernel's defaults) when neither is given."""
    import pallas_kernels

    if not text and not reduces:
        return [("", None)]
    out = []
    for item in text.split(",") if text else [""]:
        kw = {}
        if item:
            values = [int(x) if x else None for x in item.split(":")]
            names = ("tile", "sub", "chunks", "target_blocks", "bwd_lanes", "fwd_lanes")
            kw = dict(zip(names, values, strict=False))
            kw = {k: v for k, v in kw.items() if v is not None or k in ("sub", "chunks")}
        for reduce in reduces or [None]:
            extra = {} if reduce is None else {"bwd_reduce": reduce}
            label = " ".join(f"{k}={v}" for k, v in {**kw, **extra}.items() if v is not None)
            out.append((label, pallas_kernels.BlockSizes(**kw, **extra)))
    return out


def parse_triton_variants(text):
    """[(label, TritonBlockSizes or None)] from "key=value key=value,...": the Triton kernel's
    block sizes, one variant per comma-separated item; [("", None)] (its defaults) if empty."""
    if not text:
        return [("", None)]
    from pallas_kernels.triton_scan import TritonBlockSizes

    fields = {f.name for f in dataclasses.fields(TritonBlockSizes)}
    out = []
    for item in text.split(","):
        kw = {}
        for pair in item.split():
            key, _, value = pair.partition("=")
            if key not in fields or not value.lstrip("-").isdigit():
                raise ValueError(f"--triton-variants: {pair!r} is not key=integer with key "
                                 f"among {sorted(fields)}")  # fmt: skip
            kw[key] = int(value)
        out.append((" ".join(f"{k}={v}" for k, v in kw.items()), TritonBlockSizes(**kw)))
    return out


def print_table(rows, device, jax_version, inner, reps):
    print(
        f"\nselective scan, {device}, jax {jax_version}, bf16, ms per call "
        f"(median of {reps} x {inner} calls back to back)"
    )
    fmt = lambda x: f"{x:9.3f}" if isinstance(x, float) else f"{'-':>9}"
    print(f"{'shape':10} {'n':>3} {'impl':20} {'variant':14} {'fwd':>9} {'fwd+bwd':>9}  check")
    for r in rows:
        name = r.get("scan_impl", r["impl"])
        if "error" in r:
            status = r["error"][:60]
        else:
            worst = max(r["rel_err"].values()) if r.get("rel_err") else None
            status = ("ok" if r["check_ok"] else "FAILED") + (f" {worst:.1e}" if worst else "")
        print(
            f"{r['shape']:10} {r['d_state']:3d} {name:20} {r.get('variant', ''):14} "
            f"{fmt(r.get('fwd_ms'))} {fmt(r.get('fwd_bwd_ms'))}  {status}"
        )
    ours = [r for r in rows if r["impl"] == "ours" and "fwd_ms" in r]
    rivals = [r for r in rows if r["impl"] in RIVALS and "fwd_ms" in r]
    if not (ours and rivals):
        return
    print("\nrival ms / our fastest ms (> 1: ours is faster)")
    print(f"{'shape':10} {'n':>3} {'rival':10} {'fwd':>7} {'fwd+bwd':>8}")
    for r in rivals:
        mine = [o for o in ours if (o["shape"], o["d_state"]) == (r["shape"], r["d_state"])]
        if mine:
            f = r["fwd_ms"] / min(o["fwd_ms"] for o in mine)
            fb = r["fwd_bwd_ms"] / min(o["fwd_bwd_ms"] for o in mine)
            print(f"{r['shape']:10} {r['d_state']:3d} {r['impl']:10} {f:7.2f} {fb:8.2f}")


def print_tpu_floors(shapes: str):
    """Refuses a non-TPU backend; prints what the TPU kernel must move and compute per shape, and
    the time floors those imply on each chip (pallas_kernels/tpu_cost.py: datasheet HBM
    bandwidth; the VPU rate is an estimate, labelled so there)."""
    import jax

    from pallas_kernels.tpu_cost import TPU_CHIPS, tpu_scan_cost

    if jax.default_backend() != "tpu":
        raise ValueError(f"--tpu needs a TPU backend, got {jax.default_backend()!r}")
    print("shape   pass     MB moved  " + "  ".join(f"{c} floor ms" for c in TPU_CHIPS))
    for name, b, e, length in (parse_shape(s) for s in shapes.split(",")):
        cost = tpu_scan_cost((b, e, length))
        for which in ("fwd", "fwd_bwd"):
            c = cost[which]
            floors = "  ".join(
                f"{c['floors_ms'][chip]['bound']:>{len(chip) + 9}.3f}" for chip in TPU_CHIPS
            )
            print(f"{name:<7} {which:<8} {c['kernel_bytes'] / 1e6:>8.1f}  {floors}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="S1,S2,S3,S4", help="S1..S4 or BxExL, comma-separated")
    parser.add_argument(
        "--impls",
        default=None,
        help=f"of {OURS + RIVALS}; default pallas,associative (+ both rivals with --rivals)",
    )
    parser.add_argument("--rivals", default=None, help="the rivals' folder ($MAMBA_JAX_RIVALS)")
    parser.add_argument(
        "--variants",
        default="",
        help="pallas block sizes tile:sub[:chunks[:target_blocks[:bwd_lanes[:fwd_lanes]]]],...",
    )
    parser.add_argument(
        "--triton-variants",
        default="",
        help='triton block sizes, "key=value key=value,..." (TritonBlockSizes fields)',
    )
    parser.add_argument(
        "--bwd-reduce",
        default="",
        help="pallas backward dB/dC channel-sum methods to compare (smem,shuffle)",
    )
    parser.add_argument("--no-n64", action="store_true", help="skip the d_state 64 row")
    parser.add_argument("--inner", type=int, default=20, help="calls per timed repetition")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median)")
    parser.add_argument("--seed", type=int, default=None, help="check inputs (default: fresh)")
    parser.add_argument("--out", default=None, help="record path (default benchmarks/results/)")
    parser.add_argument(
        "--tpu",
        action="store_true",
        help="on a TPU: the Mosaic TPU kernel (impl pallas) beside the associative scan, with "
        "each shape's HBM and VPU floors on v5e/v5p/v6e",
    )
    parser.add_argument("--cuda-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cuda_child is not None:
        return cuda_child(json.loads(args.cuda_child), args.seed, args.inner, args.reps)
    if args.tpu:
        print_tpu_floors(args.shapes)

    rivals = rivals_dir(args.rivals)
    impls = (args.impls or "pallas,associative" + (",jla,mamba_ssm" if rivals else "")).split(",")
    for impl in impls:
        if impl.removesuffix(SEGMENTED) not in OURS and impl not in RIVALS:
            raise ValueError(
                f"--impls entries must be among {OURS + RIVALS} (ours also as IMPL{SEGMENTED}), "
                f"got {impl!r}"
            )
        if impl in RIVALS and rivals is None:
            raise ValueError(f"--impls {impl} needs --rivals PATH or $MAMBA_JAX_RIVALS")
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    plan = [(name, b, e, length, 16) for name, b, e, length in shapes]
    if not args.no_n64:
        plan.append((*shapes[0], 64))
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    reduces = [r for r in args.bwd_reduce.split(",") if r]
    variants = parse_variants(args.variants, reduces) if "pallas" in impls else [("", None)]
    triton_variants = parse_triton_variants(args.triton_variants)

    # The CUDA kernel runs first, in its own process, before JAX takes the GPU's memory.
    cuda, cuda_info = ({}, None)
    if "mamba_ssm" in impls:
        cuda, cuda_info = run_cuda(rivals, plan, seed, args.inner, args.reps)
    if "jla" in impls:
        sys.path.insert(0, str(unpack_rivals(rivals) / "site"))

    import jax
    import jax.numpy as jnp

    device = jax.devices()[0].device_kind
    date = datetime.datetime.now(datetime.UTC)
    out = args.out or (
        pathlib.Path(__file__).parent
        / "results"
        / f"scan_{date:%Y-%m-%d_%H%M}_{device.replace(' ', '_')}.json"
    )
    config = {
        "shapes": {name: [b, e, length] for name, b, e, length in shapes},
        "d_state_64": None if args.no_n64 else shapes[0][0],
        "impls": impls,
        "variants": [label for label, _ in variants],
        "triton_variants": [label for label, _ in triton_variants],
        "dtype": "bfloat16",
        "inner": args.inner,
        "reps": args.reps,
        "check_seed": seed,
        "check_tol": CHECK_TOL,
    }
    if cuda_info:
        config["mamba_ssm_torch"] = cuda_info["torch"]
    record = Record("scan", out, config)

    checks = {}  # (impl, variant, check size) -> (rel_err, check_ok) or an error string

    def check(impl, label, bs, size):
        key = (impl, label, size)
        if key not in checks:
            try:
                if impl == "mamba_ssm":
                    child = cuda[(*size, True)]
                    if "error" in child:
                        raise RuntimeError(child["error"])
                    got = child["outputs"]
                else:
                    got = outputs(impl, bs, random_inputs(*size, seed), jnp.bfloat16)
                ref = reference_outputs(size, seed, impl.endswith(SEGMENTED))
                rel = rel_errors(got, ref)
                checks[key] = (rel, max(rel.values()) <= CHECK_TOL)
            except Exception as err:  # noqa: BLE001 - recorded in the row
                checks[key] = f"{type(err).__name__}: {err}"[:400]
        return checks[key]

    for name, b, e, length, n in plan:
        for impl in impls:
            own = {"pallas": variants, "triton": triton_variants}
            for label, bs in own.get(impl, [("", None)]):
                row = {"shape": name, "batch": b, "d_inner": e, "length": length, "d_state": n}
                row.update(
                    {"impl": "ours", "scan_impl": impl, "variant": label}
                    if impl.removesuffix(SEGMENTED) in OURS
                    else {"impl": impl}
                )
                big = b * length * e * n > ASSOCIATIVE_MAX_ELEMS
                if impl.removesuffix(SEGMENTED) == "associative" and big:
                    row["error"] = "not run: its (b, l, e, n) chunk states exceed GPU memory"
                    record.add(row)
                    continue
                checked = check(impl, label, bs, (*check_size(b, e, length), n))
                if isinstance(checked, str):
                    row["error"] = checked
                    record.add(row)
                    continue
                row["rel_err"], row["check_ok"] = checked
                try:
                    if impl == "mamba_ssm":
                        timed = cuda[(b, e, length, n, False)]
                        if "error" in timed:
                            raise RuntimeError(timed["error"])
                        row["fwd_ms"], row["fwd_bwd_ms"] = timed["fwd_ms"], timed["fwd_bwd_ms"]
                    else:
                        row["fwd_ms"], row["fwd_bwd_ms"] = time_jax(
                            impl, bs, b, e, length, n, args.inner, args.reps
                        )
                except Exception as err:  # noqa: BLE001 - out of memory at one size, say
                    row["error"] = f"{type(err).__name__}: {err}"[:400]
                record.add(row)

    print_table(record.data["rows"], device, jax.__version__, args.inner, args.reps)
    print(f"wrote {out}")
    return record.data


if __name__ == "__main__":
    main()
