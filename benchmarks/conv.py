"""The causal conv + SiLU of a Mamba block: XLA's op against the Pallas kernel, the forward and
the backward (the VJP applied to a cotangent), on the models' shapes (d_conv 4, bf16).

    python benchmarks/conv.py                                  # both shapes, the default blocks
    python benchmarks/conv.py --variants "128:64:8:1,256:128:8:2" --out /tmp/conv.json

A variant is channels:chunk:unroll:warps (pallas_kernels.causal_conv.ConvBlockSizes); "" is the
default. Every variant is first checked against XLA's op on fresh random inputs (the output and
the gradients of x, the state, the kernel and the bias). Times: median of `--reps` repetitions
of `--inner` calls back to back.
"""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))

from benchmarks import record  # noqa: E402
from benchmarks.scan import median_ms  # noqa: E402

# (batch, length, d_inner): the 130m model at batch 16 and the 1.4b model at batch 8, L 2048.
SHAPES = {"130m": (16, 2048, 1536), "1.4b": (8, 2048, 4096), "tiny": (2, 40, 96)}


def parse_variant(text):
    from pallas_kernels.causal_conv import ConvBlockSizes

    if not text:
        return None
    fields = [int(v) for v in text.split(":")]
    if len(fields) != 4:
        raise ValueError(f"--variants: {text!r} is not channels:chunk:unroll:warps")
    return ConvBlockSizes(*fields)


def measure(f, args, gy, ref, inner, reps):
    """Checks f against `ref` (the first implementation's outputs; None: f is it) and times its
    forward and its VJP. Returns (row fields, ref)."""
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(f)
    vjp = jax.jit(lambda *a: jax.vjp(f, *a)[1](gy))
    got = [np.asarray(jnp.asarray(g, jnp.float32)) for g in (fwd(*args), *vjp(*args))]
    ref = got if ref is None else ref
    err = max(float(np.max(np.abs(g - r)) / max(1e-6, float(np.max(np.abs(r)))))
              for g, r in zip(got, ref, strict=True))  # fmt: skip
    sync = jax.block_until_ready
    row = {"max_rel_err": err, "check_ok": err < 3e-2,
           "fwd_ms": median_ms(lambda: fwd(*args), sync, inner, reps),
           "vjp_ms": median_ms(lambda: vjp(*args), sync, inner, reps)}  # fmt: skip
    return row, ref


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="130m,1.4b")
    parser.add_argument("--variants", default="", help="comma-separated; '' is the default")
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--interpret", action="store_true", help="the kernel in interpret mode (CPU)"
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from mamba_jax.layers import causal_conv1d_silu
    from pallas_kernels.causal_conv import causal_conv1d_silu_pallas

    variants = args.variants.split(",")
    rec = record.Record("conv", args.out, config=vars(args))
    for name in args.shapes.split(","):
        b, length, e = SHAPES[name]
        ks = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 5)
        x = jax.random.normal(ks[0], (b, length, e), jnp.bfloat16)
        state = jnp.zeros((b, 3, e), jnp.bfloat16)
        kernel = 0.5 * jax.random.normal(ks[2], (4, e))
        bias = 0.5 * jax.random.normal(ks[3], (e,))
        gy = jax.random.normal(ks[4], (b, length, e), jnp.bfloat16)
        impls = {"xla": lambda x, s, k, c: causal_conv1d_silu(x, s, k, c, jnp.dtype(jnp.bfloat16))}
        for v in variants:
            impls[v] = functools.partial(causal_conv1d_silu_pallas, out_dtype=jnp.bfloat16,
                                         blocks=parse_variant(v), interpret=args.interpret)  # fmt: skip
        ref = None
        for variant, f in impls.items():
            row, ref = measure(f, (x, state, kernel, bias), gy, ref, args.inner, args.reps)
            rec.add({"shape": name, "batch": b, "length": length, "d_inner": e, "impl": "ours",
                     "variant": variant or "default", **row})  # fmt: skip
    print(f"\ncausal conv + SiLU, {jax.devices()[0].device_kind}, bf16, ms per call")
    print("| shape | variant | fwd | backward (vjp) | max rel err |\n|---|---|---|---|---|")
    for r in rec.data["rows"]:
        print(f"| {r['shape']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['vjp_ms']:.3f} | "
              f"{r['max_rel_err']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
