"""Selective-scan benchmark: fwd and fwd+bwd milliseconds for the shapes of BENCHMARKS.md.

    python benchmarks/scan.py                         # S1-S4 at d_state 16, plus S1 at d_state 64
    python benchmarks/scan.py --shapes S1 --impls pallas --variants 16:4,32:8
    python benchmarks/scan.py --shapes S1 --impls pallas --bwd-reduce smem,shuffle --no-n64

bf16 u, delta, z, B, C; fp32 A, D, delta_bias; delta_softplus; z gate on; B/C shared (b, l, n).
Each configuration is checked against impl="reference" on a slice first, then timed: ten calls
queued back to back and synchronised once, median over repeats. Prints a table with ratios to the
mamba_ssm CUDA anchors and writes JSON (device, jax version, date, commit) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pallas_kernels  # noqa: E402
from mamba_jax.scan import selective_scan  # noqa: E402

SHAPES = {  # name: (b, d_inner, L)
    "S1": (8, 1536, 2048),
    "S2": (4, 4096, 2048),
    "S3": (2, 2048, 16384),
    "S4": (1, 1536, 131072),
}
# mamba_ssm selective_scan_cuda on one H100 80GB HBM3, 2026-11-22 (BENCHMARKS.md): fwd, fwd+bwd ms.
CUDA_ANCHORS = {"S1": (0.451, 2.29), "S2": (0.596, 3.02), "S3": (1.42, 6.42), "S4": (4.55, 20.25)}


def make_inputs(b, e, length, n, seed=0, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 8)
    u = jax.random.normal(ks[0], (b, length, e), dtype)
    delta = (jax.random.normal(ks[1], (b, length, e)) - 2.0).astype(dtype)
    A = -jnp.exp(jax.random.uniform(ks[2], (e, n), minval=0.0, maxval=np.log(n)))
    B = jax.random.normal(ks[3], (b, length, n), dtype)
    C = jax.random.normal(ks[4], (b, length, n), dtype)
    D = jax.random.normal(ks[5], (e,))
    z = jax.random.normal(ks[6], (b, length, e), dtype)
    bias = jax.random.uniform(ks[7], (e,), minval=-4.0, maxval=-2.0)
    return u, delta, A, B, C, D, z, bias


def scan_fn(impl, block_sizes=None):
    if impl == "pallas":

        def f(u, delta, A, B, C, D, z, bias):
            return pallas_kernels.selective_scan_pallas(
                u, delta, A, B, C, D, z, bias, delta_softplus=True, block_sizes=block_sizes
            )[0]
    else:

        def f(u, delta, A, B, C, D, z, bias):
            return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, impl=impl)

    return f


def fwd_bwd_fn(f):
    def loss(*args):
        return jnp.sum(f(*args).astype(jnp.float32))

    return jax.grad(loss, argnums=tuple(range(8)))


def time_ms(fn, args, repeats=15, inner=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(inner)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return float(np.median(times))


@functools.cache
def reference_outputs(b, e, n, length):
    """Inputs, y and gradients of impl="reference" (computed once per size)."""
    args = make_inputs(b, e, length, n, seed=1)
    ref = scan_fn("reference")
    return args, jax.jit(ref)(*args), jax.jit(fwd_bwd_fn(ref))(*args)


def check(impl, block_sizes, b, e, n, length=1024):
    """Max |err| / max |ref| of fwd and of every gradient against the fp32 reference."""
    args, y_ref, g_ref = reference_outputs(b, e, n, length)
    f = scan_fn(impl, block_sizes)
    errs = {}
    y = jax.jit(f)(*args)
    rel = lambda a, r: float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))) / jnp.max(jnp.abs(r.astype(jnp.float32))))  # fmt: skip
    errs["y"] = rel(y, y_ref)
    g = jax.jit(fwd_bwd_fn(f))(*args)
    for name, a, r in zip("u delta A B C D z bias".split(), g, g_ref, strict=True):
        errs["d" + name] = rel(a, r)
    return errs


def git_commit():
    from mamba_jax.bench_results import git_commit as commit

    return commit(str(pathlib.Path(__file__).resolve().parent))


def parse_variants(text, reduces):
    """Block sizes tile:sub[:chunks[:target_blocks]], each crossed with the bwd_reduce methods."""
    if not text and not reduces:
        return [None]
    out = []
    for item in text.split(",") if text else [""]:
        kw = {}
        if item:
            tile, sub, *rest = (int(x) if x else None for x in item.split(":"))
            kw = dict(zip(("tile", "sub", "chunks", "target_blocks"), (tile, sub, *rest)))
            kw = {k: v for k, v in kw.items() if v is not None or k in ("sub", "chunks")}
        for reduce in reduces or [None]:
            extra = {} if reduce is None else {"bwd_reduce": reduce}
            out.append(pallas_kernels.BlockSizes(**kw, **extra))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="S1,S2,S3,S4")
    parser.add_argument("--impls", default="pallas,associative,mamba_ssm")
    parser.add_argument(
        "--variants", default="", help="pallas block sizes tile:sub[:chunks[:target_blocks]],..."
    )
    parser.add_argument(
        "--bwd-reduce",
        default="",
        help="backward dB/dC channel-sum methods to compare (shuffle,smem); default: the kernel's",
    )
    parser.add_argument("--no-n64", action="store_true", help="skip the d_state 64 row")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()

    device = jax.devices()[0].device_kind
    rows = []
    date = datetime.datetime.now(datetime.UTC)
    path = pathlib.Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    json_path = path / f"scan_{date:%Y%m%d_%H%M%S}_{device.replace(' ', '_')}.json"
    header = dict(
        device=device,
        jax_version=jax.__version__,
        date=date.isoformat(timespec="seconds"),
        commit=git_commit(),
        cuda_anchors=CUDA_ANCHORS,
    )

    def save():  # after every row, so a run cut short still leaves its rows
        json_path.write_text(json.dumps({**header, "rows": rows}, indent=1))

    configs = [(s, 16) for s in args.shapes.split(",")]
    if not args.no_n64:
        configs.append((configs[0][0], 64))
    impls = args.impls.split(",")
    if "mamba_ssm" in impls:
        try:
            import mamba_ssm  # noqa: F401
        except ImportError:
            print("mamba_ssm is not importable: its rows are skipped")
            impls.remove("mamba_ssm")
    for shape, n in configs:
        b, e, length = SHAPES[shape]
        for impl in impls:
            reduces = [r for r in args.bwd_reduce.split(",") if r]
            variants = parse_variants(args.variants, reduces) if impl == "pallas" else [None]
            for bs in variants:
                row = dict(shape=shape, b=b, d=e, L=length, n=n, impl=impl)
                if bs is not None:
                    row["block_sizes"] = dict(
                        tile=bs.tile,
                        sub=bs.sub,
                        chunks=bs.chunks,
                        target_blocks=bs.target_blocks,
                        bwd_reduce=bs.bwd_reduce,
                    )
                if impl == "mamba_ssm":
                    print("mamba_ssm timing is not wired in this script; use the CUDA anchors")
                    continue
                if impl == "associative" and shape == "S4":
                    row["fwd_ms"] = row["fwd_bwd_ms"] = None  # (b, l, e, n) chunks exceed memory
                    rows.append(row)
                    save()
                    continue
                first = (shape, n) == configs[0] or n != 16
                if not args.no_check and impl == "pallas" and first:
                    row["rel_err"] = check(impl, bs, b=2, e=min(e, 512), n=n)
                inputs = make_inputs(b, e, length, n)
                f = scan_fn(impl, bs)
                row["fwd_ms"] = time_ms(jax.jit(f), inputs)
                row["fwd_bwd_ms"] = time_ms(jax.jit(fwd_bwd_fn(f)), inputs)
                rows.append(row)
                save()
                print(json.dumps(row), flush=True)

    print(f"\nselective scan, {device}, jax {jax.__version__}, bf16, ms (median)")
    print(f"{'shape':5} {'n':>3} {'impl':12} {'variant':20} {'fwd':>8} {'fwd+bwd':>8} "
          f"{'CUDA/fwd':>8} {'CUDA/f+b':>8}")  # fmt: skip
    for r in rows:
        cf, cb = CUDA_ANCHORS[r["shape"]] if r["n"] == 16 else (None, None)
        fmt = lambda x: f"{x:8.3f}" if x is not None else f"{'-':>8}"
        ratio = lambda c, x: f"{c / x:8.2f}" if c and x else f"{'-':>8}"
        bs = r.get("block_sizes")
        var = (
            f"{bs['tile']}:{bs['sub']}:{bs['chunks'] or ''}:{bs['target_blocks']}:"
            f"{bs['bwd_reduce']}"
            if bs
            else ""
        )
        print(f"{r['shape']:5} {r['n']:3d} {r['impl']:12} {var:20} {fmt(r['fwd_ms'])} "
              f"{fmt(r['fwd_bwd_ms'])} {ratio(cf, r['fwd_ms'])} {ratio(cb, r['fwd_bwd_ms'])}")  # fmt: skip

    save()
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
