"""Decode throughput: mamba_jax.generate beside mamba_ssm's generate(cg=True) and a same-size
JAX Transformer with a KV cache.

    python benchmarks/decode.py --rivals .anchors         # 130m and 1.4b, batch 1 and 64, GPU
    python benchmarks/decode.py --tiny                    # a seconds-long CPU run of the same code

For each model size and batch: a random bf16 model, random prompts of --prompt tokens, greedy
decoding of --new tokens. `generate` runs two programs, both timed apart and together: prefill
(the whole prompt in the parallel scan mode -> the first new token, the per-layer caches and the
weights laid out for decoding) and decode (the other new - 1 tokens in one `lax.scan`, no host
round trip per token). Tokens/s counts new tokens: decode tok/s = b (new - 1) / decode time;
end-to-end tok/s = b new / (prefill + decode), the figure mamba_ssm's generate is measured in.

Before timing, each size checks that prefill + one cached step gives the full forward's logits.
Each point reports ms per decoded token beside its HBM floor: the bytes a token must move (every
weight read once, the SSM and conv states read and written) over the copy bandwidth measured in
the same run. With --rivals (or $MAMBA_JAX_RIVALS) mamba_ssm's generate(cg=True) runs first, in
its own process, at the same points; its rows and our ratio to it go into the same record.
At batch 64 of --sampling-models the decode loop is also timed with temperature / top-k / top-p
sampling against greedy, and --profile points trace one decode call and count its GPU kernels
per token (with benchmarks/profile_summary.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformer_baseline as tfb  # noqa: E402
from record import Record, rivals_dir, run_rival  # noqa: E402

from mamba_jax import MambaConfig, MambaLM, generate  # noqa: E402
from mamba_jax import sampling as smp  # noqa: E402
from mamba_jax.scan import resolve_impl  # noqa: E402

SIZES = {"130m": (768, 24), "1.4b": (2048, 48), "tiny": (64, 2)}
VOCAB = 50277
HBM_DATASHEET = 4.8e12  # bytes/s, NVIDIA's H200 datasheet (HBM3e)
CHECK_TOL = 0.05  # bf16 relative error of prefill + one cached step vs the full forward
SAMPLING = {  # name -> generate's sampling arguments, timed against greedy
    "top_p": dict(temperature=1.0, top_p=0.9),  # a sort of the whole vocab per token
    "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
}


def point(size, batch, args, impl, arch, **more) -> dict:
    """A row's point keys (benchmarks/record.py's decode vocabulary)."""
    return dict(
        model=size,
        batch=batch,
        prompt=args.prompt,
        new_tokens=args.new,
        impl=impl,
        arch=arch,
        **more,
    )


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def median_s(fn, reps):
    """Median wall seconds of fn() (which blocks) over reps runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth(gib=2.0, reps=10) -> float:
    """Bytes/s of an elementwise pass over `gib` GiB of float32 (read + write): the HBM ceiling
    measured in the run (on an H200, 2026-12-01, a bf16 pass gave only 2.65 TB/s)."""
    n = int(gib * 2**30) // 4
    x = jax.random.uniform(jax.random.key(0), (n,), jnp.float32)
    f = jax.jit(lambda x: x * 2.0)
    return 2 * x.nbytes / median_s(lambda: f(x).block_until_ready(), reps)


class MambaRunner:
    """A random bf16 MambaLM and the two programs of `mamba_jax.generate`."""

    def __init__(self, d_model, n_layer, vocab):
        self.config = MambaConfig(
            d_model=d_model,
            n_layer=n_layer,
            vocab_size=vocab,
            dtype="bfloat16",
            param_dtype="bfloat16",
        )
        self.model = MambaLM(self.config, rngs=nnx.Rngs(0))
        self.vocab = vocab
        leaves = jax.tree.leaves(nnx.state(self.model, nnx.Param))
        self.params = sum(int(x.size) for x in leaves)
        self.param_bytes = sum(int(x.nbytes) for x in leaves)

    def prefill(self, ids, **sampling):
        return smp.prefill(self.model, ids, jax.random.key(1), **sampling)

    def decode(self, first, decoder, caches, steps, **sampling):
        return smp.decode(decoder, first, caches, steps, jax.random.key(2), **sampling)[0]

    def token_bytes(self, batch) -> int:
        """Bytes one decoded token must move at least: every weight once, the states read and
        written (the input embedding rows are negligible)."""
        c = self.config
        ssm = batch * c.d_inner * c.d_state * 4
        conv = batch * (c.d_conv - 1) * c.d_inner * 2
        return self.param_bytes + 2 * c.n_layer * (ssm + conv)

    def check(self, key, prefix=16):
        """Relative error of prefill + one cached step (generate's own programs) against the
        full forward's logits at the next position."""
        ids = jax.random.randint(key, (2, prefix + 1), 0, self.vocab)
        graphdef, state = nnx.split(self.model)
        full = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, last_only=True)[:, -1])(state, ids)
        _, decoder, caches = self.prefill(ids[:, :prefix])
        step = jax.jit(lambda d, t, c: d.step(t, c)[0])(decoder, ids[:, prefix], caches)
        return rel_err(step, full)

    def decode_is_one_loop(self, batch, prompt, steps) -> bool:
        """The decode program's only loop is the token loop: the layers are straight-line code."""
        ids = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
        first, decoder, caches = jax.eval_shape(self.prefill, ids)
        args = smp._sampling_args(0.0, None, None, self.vocab)
        lowered = smp._decode_jit.lower(
            decoder, first, caches, jax.random.key(0), *args[0], steps=steps, **args[1]
        )
        return lowered.as_text().count("stablehlo.while") == 1


def prompts(key, batch, length, vocab):
    return jax.block_until_ready(jax.random.randint(key, (batch, length), 0, vocab))


def time_mamba(runner, batch, args, sampling=None):
    """Median prefill and decode seconds (each run on fresh prompts) and the last run's tokens."""
    sampling = sampling or {}
    key = jax.random.key(batch)
    pre, dec = [], []
    for i in range(args.reps + 1):
        key, k = jax.random.split(key)
        ids = prompts(k, batch, args.prompt, runner.vocab)
        t0 = time.perf_counter()
        first, decoder, caches = jax.block_until_ready(runner.prefill(ids, **sampling))
        t1 = time.perf_counter()
        rest = jax.block_until_ready(
            runner.decode(first, decoder, caches, args.new - 1, **sampling)
        )
        t2 = time.perf_counter()
        if i:
            pre.append(t1 - t0)
            dec.append(t2 - t1)
    tokens = np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], 1)
    return float(np.median(pre)), float(np.median(dec)), ids, tokens


def rates(batch, new, prefill_s, decode_s) -> dict:
    return {
        "prefill_ms": 1e3 * prefill_s,
        "decode_ms": 1e3 * decode_s,
        "tokens_per_s": batch * new / (prefill_s + decode_s),
        "decode_tokens_per_s": batch * (new - 1) / decode_s,
        "ms_per_token": 1e3 * decode_s / (new - 1),
    }


def profile_decode(runner, batch, args) -> dict:
    """One traced decode call: GPU kernels per token, their busy time and the wall per token."""
    import profile_summary as ps  # benchmarks/profile_summary.py

    ids = prompts(jax.random.key(7), batch, args.prompt, runner.vocab)
    first, decoder, caches = runner.prefill(ids)
    steps = args.new - 1
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            t0 = time.perf_counter()
            jax.block_until_ready(runner.decode(first, decoder, caches, steps))
            wall = time.perf_counter() - t0
        events = ps.device_ops(trace)
    rows, totals = ps.summarize(events, top=8, steps=steps)
    return {
        "kernels_per_token": totals["events"] / steps,
        "kernel_ms_per_token": totals["device_ms"] / steps,
        "traced_wall_ms_per_token": 1e3 * wall / steps,
        "top_kernels": [(r["name"][:80], r["count"], round(r["per_step_ms"], 4)) for r in rows],
    }


def bench_mamba(size, args, record, rival, bandwidth, t_start):
    d_model, n_layer = SIZES[size]
    mamba = MambaRunner(d_model, n_layer, VOCAB if size != "tiny" else 97)
    t0 = time.perf_counter()
    err = mamba.check(jax.random.key(3))
    print(
        f"{size}: {mamba.params / 1e6:.1f}M params; prefill + step vs full forward: rel err "
        f"{err:.2e} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    if not err <= CHECK_TOL:
        raise RuntimeError(f"{size}: the cached path disagrees with the full forward: {err}")
    for batch in args.batches:
        row = point(size, batch, args, "ours", "mamba", params=mamba.params, cache_rel_err=err)
        if time.perf_counter() - t_start > args.budget_s:
            record.add({**row, "error": "time budget spent"})
            continue
        t_row = time.perf_counter()
        try:
            c = mamba.config
            row["scan_impl"] = resolve_impl(
                "auto", batch, args.prompt, c.d_inner, c.d_state, 1, jnp.bfloat16
            )
            prefill_s, decode_s, ids, toks = time_mamba(mamba, batch, args)
            row.update(rates(batch, args.new, prefill_s, decode_s))
            row["floor_ms_per_token"] = 1e3 * mamba.token_bytes(batch) / bandwidth
            row["over_floor"] = row["ms_per_token"] / row["floor_ms_per_token"]
            row["floor_ms_per_token_datasheet"] = 1e3 * mamba.token_bytes(batch) / HBM_DATASHEET
            gen = lambda ids=ids: generate(mamba.model, ids, args.new).block_until_ready()  # noqa: E731
            gen_s = median_s(gen, args.reps)
            row["generate_ms"] = 1e3 * gen_s
            row["generate_tokens_per_s"] = batch * args.new / gen_s
            out = np.asarray(gen())[:, args.prompt :]
            row["generate_matches_prefill_decode"] = float(np.mean(out == toks))
            row["decode_one_program"] = mamba.decode_is_one_loop(batch, args.prompt, args.new - 1)
            theirs = rival.get(f"decode_{size}_b{batch}")
            if isinstance(theirs, dict):
                row["vs_mamba_ssm"] = row["generate_tokens_per_s"] / theirs["new_tokens_per_s"]
            if f"{size}:{batch}" in args.profile:
                row["profile"] = profile_decode(mamba, batch, args)
            if batch in args.sampling_batches and size in args.sampling_models:
                row["sampling"] = time_sampling(mamba, batch, args, prefill_s, decode_s)
        except Exception as e:  # an OOM at one point should not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["row_wall_s"] = time.perf_counter() - t_row
        record.add(row)


def bench_transformer(size, args, record, t_start):
    d_model, n_layer = SIZES[size]
    vocab = VOCAB if size != "tiny" else 97
    tf = None
    for batch in args.batches:
        if f"{size}:{batch}" not in args.transformer:
            continue
        row = point(size, batch, args, "ours", "transformer")
        if time.perf_counter() - t_start > args.budget_s:
            record.add({**row, "error": "time budget spent"})
            continue
        try:
            tf = tf or tfb.Runner(d_model, n_layer, vocab, args.prompt + args.new, args.attention)
            row.update(
                params=tf.params,
                layers=tf.config.n_layer,
                heads=tf.config.n_head,
                cache_rel_err=tf.check(jax.random.key(4)),
                prefill_attention=tf.config.prefill_attention,
            )
            prompt = lambda k, b=batch: prompts(k, b, args.prompt, vocab)  # noqa: E731
            row.update(rates(batch, args.new, *tf.time(prompt, args.new, args.transformer_reps)))
            mamba = {(r["model"], r["batch"], r["arch"]): r for r in record.data["rows"]}
            mamba = mamba.get((size, batch, "mamba"), {})
            if "tokens_per_s" in mamba:
                row["mamba_speedup"] = mamba["tokens_per_s"] / row["tokens_per_s"]
                row["mamba_decode_speedup"] = (
                    mamba["decode_tokens_per_s"] / row["decode_tokens_per_s"]
                )
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        record.add(row)


def time_sampling(mamba, batch, args, greedy_prefill_s, greedy_decode_s) -> dict:
    """Decode seconds with each sampling setting, and its cost over greedy: on the decode loop
    alone and end to end (greedy prefill + that loop)."""
    out = {}
    for name, kw in SAMPLING.items():
        _, decode_s, _, toks = time_mamba(mamba, batch, args, kw)
        if toks.max() >= mamba.vocab:
            raise RuntimeError(f"{name} sampled a padded vocab id {toks.max()}")
        out[name] = {
            "decode_ms": 1e3 * decode_s,
            "decode_overhead": decode_s / greedy_decode_s - 1,
            "e2e_overhead": (greedy_prefill_s + decode_s) / (greedy_prefill_s + greedy_decode_s)
            - 1,
        }
    return out


def rival_rows(rival, args, record):
    for size in args.models.split(","):
        for batch in args.batches:
            got = rival.get(f"decode_{size}_b{batch}")
            row = point(size, batch, args, "mamba_ssm", "mamba", method="generate(cg=True)")
            row.update(prompt=2048, new_tokens=128)  # what mamba_ssm_e2e.py runs
            if isinstance(got, dict):
                row.update(tokens_per_s=got["new_tokens_per_s"], total_ms=1e3 * got["total_s"])
            else:
                row["error"] = str(got or rival.get("error", "not run"))[:300]
            record.add(row)


def table(rows) -> str:
    ours = {
        (r["model"], r["batch"]): r for r in rows if r["impl"] == "ours" and r["arch"] == "mamba"
    }
    rival = {(r["model"], r["batch"]): r for r in rows if r["impl"] == "mamba_ssm"}
    tf = {(r["model"], r["batch"]): r for r in rows if r["arch"] == "transformer"}
    head = ("model", "batch", "prefill ms", "ms/token", "floor ms (copy / 4.8 TB/s)", "x floor", "e2e tok/s",
            "generate tok/s", "mamba_ssm tok/s", "ours / mamba_ssm", "transformer tok/s")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in ours.items():
        if "error" in r:
            lines.append(f"| {key[0]} | {key[1]} | error: {r['error'][:100]} |")
            continue
        theirs = rival.get(key, {}).get("tokens_per_s")
        t = tf.get(key, {}).get("tokens_per_s")
        cells = (f"{r['prefill_ms']:.1f}", f"{r['ms_per_token']:.3f}",
                 f"{r['floor_ms_per_token']:.3f} / {r['floor_ms_per_token_datasheet']:.3f}",
                 f"{r['over_floor']:.2f} / {r['ms_per_token'] / r['floor_ms_per_token_datasheet']:.2f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['generate_tokens_per_s']:,.0f}",
                 f"{theirs:,.0f}" if theirs else "-",
                 f"{r['generate_tokens_per_s'] / theirs:.2f}" if theirs else "-",
                 f"{t:,.0f}" if t else "-")  # fmt: skip
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    for key, r in ours.items():
        for name, s in r.get("sampling", {}).items():
            lines.append(
                f"sampling {key[0]} b{key[1]} {name}: decode +{100 * s['decode_overhead']:.1f}%, "
                f"end to end +{100 * s['e2e_overhead']:.1f}% over greedy"
            )
        if "profile" in r:
            p = r["profile"]
            lines.append(
                f"profile {key[0]} b{key[1]}: {p['kernels_per_token']:.0f} kernels/token, "
                f"{p['kernel_ms_per_token']:.3f} ms kernel time/token, "
                f"{p['traced_wall_ms_per_token']:.3f} ms wall/token (traced)"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="130m,1.4b")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rivals", default=None, help="the rivals' folder (default $MAMBA_JAX_RIVALS)")
    p.add_argument(
        "--transformer",
        default="all",
        help="points SIZE:BATCH (comma-separated) that also time the Transformer, 'all' or 'none'",
    )
    p.add_argument("--transformer-reps", type=int, default=1)
    p.add_argument("--attention", default=None, help="prefill attention: xla | cudnn (GPU default)")
    p.add_argument(
        "--sampling-models", default="130m", help="sizes whose batch-64 point times sampling"
    )
    p.add_argument("--sampling-batches", default="64")
    p.add_argument("--profile", default="", help="points SIZE:BATCH whose decode is traced")
    p.add_argument(
        "--budget-s", type=float, default=1e9, help="start no new point after this many seconds"
    )
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batches, args.prompt, args.new, args.reps = "tiny", "1,4", 32, 8, 1
        args.sampling_models, args.sampling_batches = "tiny", "4"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sampling_models = args.sampling_models.split(",")
    args.sampling_batches = [int(b) for b in args.sampling_batches.split(",") if b]
    args.profile = [s for s in args.profile.split(",") if s]
    points = [f"{m}:{b}" for m in args.models.split(",") for b in args.batches]
    args.transformer = {"all": points, "none": []}.get(
        args.transformer, args.transformer.split(",")
    )

    # The rival first, in its own process, before this one takes the GPU's memory.
    rivals, rival = rivals_dir(args.rivals), {}
    if rivals is not None:
        t0 = time.perf_counter()
        what = [f"decode_{m}_b{b}" for m in args.models.split(",") for b in args.batches]
        rival = run_rival(rivals, "mamba_ssm_e2e.py", what)
        print(f"mamba_ssm ({time.perf_counter() - t0:.0f} s): {rival}", flush=True)
        if (args.prompt, args.new) != (2048, 128):
            print("note: mamba_ssm_e2e.py always runs prompt 2048 + 128 new tokens", flush=True)

    platform = jax.devices()[0].platform
    args.attention = args.attention or ("cudnn" if platform == "gpu" else "xla")
    now = datetime.datetime.now(datetime.UTC)
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"decode_{now:%Y-%m-%d}_{jax.devices()[0].device_kind.replace(' ', '_')}.json",
    )
    config = {k: v for k, v in vars(args).items() if k not in ("out", "rivals")}
    record = Record("decode", out, {**config, "dtype": "bfloat16", "sampling": "greedy"})
    bandwidth = copy_bandwidth(gib=0.25 if args.tiny else 2.0)
    record.data["config"]["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    if rivals is not None:
        record.data["config"]["rival_device"] = rival.get("device")
        rival_rows(rival, args, record)

    t_start = time.perf_counter()
    for size in args.models.split(","):
        try:
            bench_mamba(size, args, record, rival, bandwidth, t_start)
        except Exception as e:  # a failed check or setup at one size: record it, go on
            record.add(
                point(size, None, args, "ours", "mamba", error=f"{type(e).__name__}: {e}"[:400])
            )
    for size in args.models.split(","):  # after every Mamba point: the budget drops these first
        bench_transformer(size, args, record, t_start)
    record.data["config"]["wall_s"] = time.perf_counter() - t_start
    record.write()
    d = record.data
    print(
        f"\n{d['device']}, jax {d['jax']}, {d['date']}, commit {str(d['commit'])[:10]}, "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    print(table(d["rows"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
