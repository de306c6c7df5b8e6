"""Training throughput: tokens/s, MFU (6N rule, BENCHMARKS.md) and peak memory of the full jitted
train step (forward, backward, AdamW) on synthetic random tokens.

    python benchmarks/train_throughput.py                       # 130m b16 and 1.4b b8 at L=2048
    python benchmarks/train_throughput.py --models 130m --batch 16 --scan-impl associative
    python benchmarks/train_throughput.py --mesh 1,2,1          # fsdp over 2 GPUs
    python benchmarks/train_throughput.py --tiny --scan-impl reference   # CPU check, seconds

Prints a table and writes JSON (device, jax version, date, git commit). Imports neither Grain nor
tensorboardX, so it runs wherever JAX, Flax and Optax do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mamba_jax import sharding as shd  # noqa: E402
from mamba_jax.config import PRESETS, MambaConfig, MeshConfig, TrainConfig  # noqa: E402
from mamba_jax.training import trainer  # noqa: E402


def resolved_impl(model_config, batch, length):
    try:
        from mamba_jax.scan import resolve_impl

        c = model_config
        return resolve_impl(c.scan_impl, batch, length, c.d_inner, c.d_state, 1, jnp.bfloat16)
    except Exception as err:  # noqa: BLE001 - only a label for the table
        return f"{model_config.scan_impl} ({type(err).__name__})"


# A CPU-sized model for checking the script itself (--tiny).
TINY = MambaConfig(d_model=64, n_layer=2)


def bench(name, batch, length, args, mesh, scan_impl):
    preset = TINY if name == "tiny" else PRESETS[name]
    model_config = preset.replace(
        dtype="bfloat16", param_dtype="float32", scan_impl=scan_impl,
        remat=name in args.remat.split(","), vocab_size=args.vocab,
    )  # fmt: skip
    # (--tiny runs only a few steps: no warmup and a larger lr, so the loss check still means it)
    warmup, lr = (1, 1e-2) if name == "tiny" else (10, 1e-3)
    train_config = TrainConfig(steps=1000, batch_size=batch, seq_len=length, warmup_steps=warmup,
                               lr=lr)  # fmt: skip
    tx = trainer.make_optimizer(train_config)
    graphdef, state, shardings = trainer.init_state(model_config, tx, mesh, seed=0)
    n_params = trainer.count_params(state["params"])
    step = trainer.make_train_step(graphdef, tx, train_config, shardings, mesh)
    rng = np.random.default_rng(0)
    batches = []
    # Two batches of fresh random tokens, alternated: the step time does not depend on the data,
    # and the loss check below compares the same batch's loss before and after training on it.
    for _ in range(2):
        tokens = rng.integers(0, model_config.vocab_size, (batch, length + 1)).astype(np.int32)
        batches.append(trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                            mesh))  # fmt: skip
    t0 = time.perf_counter()
    state, metrics = step(state, batches[0])
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    if not np.isfinite(first_loss):
        raise RuntimeError(f"first loss is {first_loss}")
    for i in range(args.warmup):
        state, metrics = step(state, batches[(i + 1) % 2])
    jax.block_until_ready(metrics)
    times = []
    steps = args.steps + (args.warmup + args.steps) % 2  # end on batch 0 again
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, batches[(args.warmup + 1 + i) % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    # The last step saw batch 0 again: after training on it, its loss must be lower (the model
    # memorises it); a broken step would not.
    if not float(metrics["loss"]) < first_loss:
        raise RuntimeError(f"loss did not fall: {first_loss} -> {float(metrics['loss'])}")
    median = statistics.median(times)
    tokens_per_sec = batch * length / median
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "model": name, "batch": batch, "seq_len": length, "params": n_params,
        "scan_impl": resolved_impl(model_config, batch // shd.batch_divisor(mesh), length),
        "remat": model_config.remat, "mesh": dict(mesh.shape),
        "step_ms_median": median * 1e3, "step_ms_min": min(times) * 1e3,
        "tokens_per_sec": tokens_per_sec,
        "mfu": trainer.mfu(n_params, tokens_per_sec, mesh.size),
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "compile_s": compile_s, "first_loss": first_loss, "last_loss": float(metrics["loss"]),
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="130m,1.4b")
    parser.add_argument("--batch", default="16,8", help="global batch per model")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scan-impl", default="auto")
    parser.add_argument("--fallback", default="associative", help="impl to retry with on error")
    parser.add_argument("--remat", default="1.4b,2.8b", help="models trained with nnx.remat")
    parser.add_argument("--vocab", type=int, default=50277)
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
    parser.add_argument("--out", default="train_throughput.json")
    parser.add_argument(
        "--tiny", action="store_true",
        help="check the script on CPU: a 2-layer d_model 64 model, batch 4 x 128, vocab 257",
    )  # fmt: skip
    args = parser.parse_args()
    if args.tiny:
        args.models, args.batch, args.seq_len, args.vocab = "tiny", "4", 128, 257
        args.steps, args.warmup = min(args.steps, 3), 1
    mesh = shd.make_mesh(MeshConfig(*(int(x) for x in args.mesh.split(","))))
    device = jax.devices()[0]
    rows = []
    for name, batch in zip(args.models.split(","), (int(b) for b in args.batch.split(","))):
        impls = [args.scan_impl] + ([args.fallback] if args.fallback else [])
        for impl in impls:
            try:
                row = bench(name, batch, args.seq_len, args, mesh, impl)
            except Exception as err:  # noqa: BLE001 - record the failure (e.g. OOM) and go on
                row = {"model": name, "batch": batch, "scan_impl": impl,
                       "error": f"{type(err).__name__}: {err}"[:500]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.out, device, mesh, rows)
            if "error" not in row:
                break
    print(f"\n{device.device_kind} x{mesh.size}, jax {jax.__version__}")
    print("| model | batch x L | scan | remat | tokens/s | MFU (6N) | step ms | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {r['scan_impl']} | error: {r['error'][:80]} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['model']} | {r['batch']} x {r['seq_len']} | {r['scan_impl']} | {r['remat']} "
              f"| {r['tokens_per_sec']:,.0f} | {mfu} | {r['step_ms_median']:.1f} "
              f"| {r['peak_gib']:.1f} |")  # fmt: skip


def write_json(path, device, mesh, rows):
    from mamba_jax.bench_results import git_commit

    commit = git_commit(os.path.dirname(os.path.abspath(__file__)))
    result = {
        "benchmark": "train_throughput", "device": device.device_kind, "num_devices": mesh.size,
        "jax": jax.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "commit": commit, "rows": rows,
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
