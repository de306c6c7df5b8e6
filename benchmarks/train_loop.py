"""Where a training loop's time goes: the jitted train step alone against the same step fed by
the data pipeline, for models small enough that the loop around the step can dominate.

    python benchmarks/train_loop.py                   # d_model 384, 12 layers, 16 x 1024, stdlib
    python benchmarks/train_loop.py --d-model 768 --n-layer 24 --batch 16 --seq-len 2048
    python benchmarks/train_loop.py --tiny            # CPU check of the script, seconds

The data are the default corpus (the running Python's standard library, bytes) through the same
Grain pipeline train.py uses, packed with segment ids. Each row times `--steps` steps after one
untimed step (its compilation) and prints the median and the first three per-step wall times:

    step, one batch, sync      the same device batch every step, waiting for each step
    step, one batch, async     the same, waiting once at the end (pure device time per step)
    data next()                the Grain iterator alone
    step + data, async         a fresh batch per step, waiting once at the end
    step + data, sync          a fresh batch per step, waiting for each step

If "step + data" is far above "step, one batch", the host side (the pipeline, the transfer,
the dispatch) is the bottleneck, not the model.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _timed(fn, steps, sync_each):
    """Per-step wall seconds of `steps` calls of fn (which returns something to wait on)."""
    import jax

    times, out = [], None
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        out = fn()
        if sync_each:
            jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    if not sync_each:
        jax.block_until_ready(out)
        total = time.perf_counter() - start
        times = [total / steps] * steps
    return times


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scan-impl", default="auto")
    parser.add_argument("--tiny", action="store_true", help="d_model 32, 2 layers, 2 x 64 (CPU)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.d_model, args.n_layer, args.batch, args.seq_len, args.steps = 32, 2, 2, 64, 3
        args.scan_impl = "reference"

    import jax

    from mamba_jax import MambaConfig
    from mamba_jax import sharding as shd
    from mamba_jax.config import MeshConfig
    from mamba_jax.training import data, trainer
    from mamba_jax.training.run_config import DataConfig, TrainConfig

    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=257,
                      dtype="bfloat16", scan_impl=args.scan_impl)  # fmt: skip
    mesh = shd.make_mesh(MeshConfig(-1, 1, 1, 1), jax.devices()[:1])  # one device
    tc = TrainConfig(steps=10_000, batch_size=args.batch, seq_len=args.seq_len, warmup_steps=10)
    tx = trainer.make_optimizer(tc)
    graphdef, state, shardings = trainer.init_state(cfg, tx, mesh, 0)
    step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
    corpus = data.load_corpus(DataConfig(max_files=400 if args.tiny else None), 257)
    batches = iter(
        data.train_dataset(
            corpus.train_tokens, args.seq_len, args.batch, 0, eos_id=corpus.tokenizer.eos_id
        )
    )
    fixed = trainer.global_batch(next(batches), mesh)
    holder = {"state": step(state, fixed)[0]}  # compiles; the state is donated from here on

    def one(batch):
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    rows = [
        ("step, one batch, sync", _timed(lambda: one(fixed), args.steps, True)),
        ("step, one batch, async", _timed(lambda: one(fixed), args.steps, False)),
        ("data next()", _timed(lambda: next(batches)["inputs"], args.steps, False)),
        (
            "step + data, async",
            _timed(lambda: one(trainer.global_batch(next(batches), mesh)), args.steps, False),
        ),
        (
            "step + data, sync",
            _timed(lambda: one(trainer.global_batch(next(batches), mesh)), args.steps, True),
        ),
    ]
    tokens = args.batch * args.seq_len
    print(
        f"{jax.devices()[0].device_kind}: d_model {args.d_model}, {args.n_layer} layers, "
        f"{args.batch} x {args.seq_len}, scan {args.scan_impl}, {args.steps} steps per row"
    )
    print(f"{'':26s} {'median ms':>10s} {'tokens/s':>12s}  first steps (ms)")
    out = []
    for name, times in rows:
        median = statistics.median(times)
        first = " ".join(f"{t * 1e3:.1f}" for t in times[:3])
        print(f"{name:26s} {median * 1e3:10.2f} {tokens / median:12,.0f}  {first}")
        out.append({"row": name, "median_ms": median * 1e3, "tokens_per_s": tokens / median})
    return out


if __name__ == "__main__":
    main()
