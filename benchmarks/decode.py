"""Decode throughput: MambaLM vs a same-size Transformer with a KV cache, in one process.

    python benchmarks/decode.py                       # 130m and 1.4b, batch 1 and 64, on the GPU
    python benchmarks/decode.py --tiny                # a seconds-long CPU run of the same code

For each model size and batch: a random bf16 model, random prompts of --prompt tokens, greedy
decoding of --new tokens. Timed separately, each as one compiled program with no host round trip
per token: prefill (prompt -> first new token + cache) and decode (the other new - 1 tokens in
one `lax.scan`). For Mamba, `mamba_jax.generate` (prefill and decode in one program) is timed too.
Tokens/s counts new tokens: decode tok/s = b (new - 1) / decode time; end-to-end tok/s =
b new / (prefill + decode), the figure BENCHMARKS.md quotes for mamba_ssm.

Before timing, each model checks that prefill + one cached step gives the logits of a full forward
pass. Every repetition draws fresh prompts; the median of --reps repetitions after one warm-up is
reported. Results go to a JSON file with the device, jax version, date and commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformer_baseline as tfb  # noqa: E402

from mamba_jax import MambaConfig, MambaLM, generate  # noqa: E402

SIZES = {"130m": (768, 24), "1.4b": (2048, 48), "tiny": (64, 2)}
VOCAB = 50277


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class MambaRunner:
    """prefill: (state, ids (b, l)) -> (first new token (b,), cache); decode: (state, token,
    cache, steps) -> (tokens (b, steps), cache). Each is one jitted program; decode donates the
    cache and returns it, so the loop updates it in place."""

    def __init__(self, d_model, n_layer, vocab, scan_impl="auto"):
        cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, dtype="bfloat16",
                          param_dtype="bfloat16", scan_impl=scan_impl)  # fmt: skip
        self.model = MambaLM(cfg, rngs=nnx.Rngs(0))
        self.scan_impl = scan_impl
        self.graphdef, self.state = nnx.split(self.model)
        self.vocab = vocab
        self.params = sum(int(x.size) for x in jax.tree.leaves(self.state))
        self.prefill = jax.jit(self._prefill)
        self.decode = jax.jit(self._decode, static_argnums=3, donate_argnums=2)

    def _prefill(self, state, ids):
        m = nnx.merge(self.graphdef, state)
        # The model returns logits for every position; only the last one is needed, so the
        # prompt's last token goes through `step`, and the unused (b, l - 1, v) logits are never
        # computed (at b 64, l 2048 they would be 26 GB of fp32).
        _, cache = m(ids[:, :-1], cache=m.init_cache(ids.shape[0]))
        logits, cache = m.step(ids[:, -1], cache)
        return jnp.argmax(logits[:, : self.vocab], -1).astype(jnp.int32), cache

    def _decode(self, state, token, cache, steps):
        def body(carry, _):
            token, cache = carry
            # A fresh module per trace level: nnx refuses Variables from the enclosing trace.
            model = nnx.merge(self.graphdef, jax.tree.map(lambda x: x, state))
            logits, cache = model.step(token, cache)
            nxt = jnp.argmax(logits[:, : self.vocab], -1).astype(jnp.int32)
            return (nxt, cache), nxt

        (_, cache), tokens = jax.lax.scan(body, (token, cache), None, length=steps)
        return tokens.T, cache

    def check(self, key, prefix=16):
        """Relative error of prefill + one cached step against the full forward's last logits."""
        ids = jax.random.randint(key, (2, prefix + 1), 0, self.vocab)
        full = self.model(ids)[:, -1]
        _, cache = self.model(ids[:, :prefix], cache=self.model.init_cache(2))
        step, _ = self.model.step(ids[:, prefix], cache)
        return rel_err(step, full)

    def generate(self, ids, new):
        return generate(self.model, ids, new)


class TransformerRunner:
    """The same interface over benchmarks/transformer_baseline.py's KV-cache Transformer."""

    def __init__(self, d_model, mamba_layers, vocab, max_len, attention):
        self.config = tfb.matched_config(
            d_model, mamba_layers, ((vocab + 7) // 8) * 8, prefill_attention=attention
        )
        self.state = tfb.init_params(self.config, jax.random.key(0))
        self.vocab, self.max_len = vocab, max_len
        self.params = tfb.count_params(self.state)
        self.prefill = jax.jit(self._prefill)
        self.decode = jax.jit(self._decode, static_argnums=3, donate_argnums=2)

    def _prefill(self, params, ids):
        logits, cache = tfb.prefill(self.config, params, ids, self.max_len)
        return jnp.argmax(logits[:, : self.vocab], -1).astype(jnp.int32), cache

    def _decode(self, params, token, cache, steps):
        start = self.max_len - steps - 1  # the prompt's length: the first new token goes there
        return tfb.decode(self.config, params, token, cache, start, steps, self.vocab)

    def check(self, key, prefix=16):
        c, p = self.config, self.state
        ids = jax.random.randint(key, (2, prefix + 1), 0, self.vocab)
        full, _ = tfb.forward(c, p, ids, tfb.init_cache(c, 2, prefix + 1), 0)
        _, cache = tfb.forward(c, p, ids[:, :prefix], tfb.init_cache(c, 2, prefix + 1), 0)
        step, _ = tfb.forward(c, p, ids[:, prefix:], cache, prefix)
        return rel_err(step[:, 0], full[:, -1])


def decode_is_one_loop(runner, batch, prompt, steps) -> bool:
    """True when the compiled decode holds the token loop (a while loop over `steps`), i.e. the
    host dispatches once per generation, not once per token."""
    ids = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
    first, cache = jax.eval_shape(runner.prefill, runner.state, ids)
    text = runner.decode.lower(runner.state, first, cache, steps).as_text()
    return "stablehlo.while" in text


def time_prefill_decode(runner, batch, prompt, new, reps, seed):
    """Median prefill and decode seconds over `reps` runs after a warm-up; fresh prompts each."""
    key = jax.random.key(seed)
    pre, dec, tokens = [], [], None
    for i in range(reps + 1):
        key, k = jax.random.split(key)
        ids = jax.block_until_ready(jax.random.randint(k, (batch, prompt), 0, runner.vocab))
        t0 = time.perf_counter()
        first, cache = jax.block_until_ready(runner.prefill(runner.state, ids))
        t1 = time.perf_counter()
        rest, _ = jax.block_until_ready(runner.decode(runner.state, first, cache, new - 1))
        t2 = time.perf_counter()
        if i:
            pre.append(t1 - t0)
            dec.append(t2 - t1)
        tokens = (ids, np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], 1))
    return float(np.median(pre)), float(np.median(dec)), tokens


def run_one(name, runner, batch, args, row):
    p, d, (ids, toks) = time_prefill_decode(runner, batch, args.prompt, args.new, args.reps, 1)
    row.update({
        f"{name}_prefill_s": p, f"{name}_decode_s": d,
        f"{name}_decode_tok_s": batch * (args.new - 1) / d,
        f"{name}_e2e_tok_s": batch * args.new / (p + d),
    })  # fmt: skip
    return ids, toks


def scan_impl_used(runner, batch, length):
    try:
        from mamba_jax.scan import resolve_impl

        c = runner.model.config
        return resolve_impl(c.scan_impl, batch, length, c.d_inner, c.d_state, 1, jnp.bfloat16)
    except Exception as err:  # reporting only
        return f"unknown ({type(err).__name__})"


def with_fallback(label, runner, rebuild, batch, args, row):
    """run_one; on failure (a kernel that does not compile, say) once more with rebuild()."""
    try:
        return runner, run_one(label, runner, batch, args, row)
    except Exception as err:
        row[f"{label}_first_try_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        runner = rebuild()
        return runner, run_one(label, runner, batch, args, row)


CHECK_TOL = 0.05  # bf16 relative error of prefill + one cached step vs the full forward


def bench_size(size, args, results, t_start):
    if time.perf_counter() - t_start > args.budget_s:
        print(f"budget spent: skipping {size}", flush=True)
        results["skipped"].append(size)
        return
    d_model, n_layer = SIZES[size]
    vocab = VOCAB if size != "tiny" else 97
    mamba = MambaRunner(d_model, n_layer, vocab)
    tf = TransformerRunner(d_model, n_layer, vocab, args.prompt + args.new, args.attention)
    checks = {
        "mamba_cache_rel_err": mamba.check(jax.random.key(3)),
        "transformer_cache_rel_err": tf.check(jax.random.key(4)),
    }
    print(f"{size}: mamba {mamba.params / 1e6:.1f}M params, transformer {tf.params / 1e6:.1f}M "
          f"({tf.config.n_layer} layers, {tf.config.n_head} heads); checks {checks}", flush=True)  # fmt: skip
    bad = {k: v for k, v in checks.items() if not v <= CHECK_TOL}
    if bad:
        raise RuntimeError(f"{size}: the cached path disagrees with the full forward: {bad}")
    for batch in args.batches:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget spent: skipping {size} batch {batch}", flush=True)
            results["skipped"].append(f"{size} batch {batch}")
            continue
        row = {"model": size, "batch": batch, "prompt": args.prompt, "new_tokens": args.new,
               "mamba_params": mamba.params, "transformer_params": tf.params,
               "transformer_layers": tf.config.n_layer, "transformer_heads": tf.config.n_head,
               **checks}  # fmt: skip
        t_row = time.perf_counter()
        try:
            mamba, (ids, toks) = with_fallback(
                "mamba", mamba, lambda: MambaRunner(d_model, n_layer, vocab, "associative"),
                batch, args, row,
            )  # fmt: skip
            row["mamba_scan_impl"] = scan_impl_used(mamba, batch, args.prompt - 1)
            tf, _ = with_fallback(
                "transformer", tf,
                lambda: TransformerRunner(d_model, n_layer, vocab, args.prompt + args.new, "xla"),
                batch, args, row,
            )  # fmt: skip
            row["prefill_attention"] = tf.config.prefill_attention
            row["decode_speedup"] = row["mamba_decode_tok_s"] / row["transformer_decode_tok_s"]
            row["e2e_speedup"] = row["mamba_e2e_tok_s"] / row["transformer_e2e_tok_s"]
            row["decode_one_program"] = all(
                decode_is_one_loop(r, batch, args.prompt, args.new - 1) for r in (mamba, tf)
            )
            time_generate(mamba, ids, toks, batch, args, row)
        except Exception as err:  # an OOM at one size should not lose the others
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        row["row_wall_s"] = time.perf_counter() - t_row
        results["rows"].append(row)
        write(results, args.out)
        print(json.dumps(row), flush=True)


def time_generate(mamba, ids, toks, batch, args, row):
    """The library's one-program `generate` (prefill + decode), end to end."""
    try:
        gen = []
        for i in range(args.reps + 1):
            t0 = time.perf_counter()
            out = jax.block_until_ready(mamba.generate(ids, args.new))
            if i:
                gen.append(time.perf_counter() - t0)
        row["mamba_generate_s"] = float(np.median(gen))
        row["mamba_generate_tok_s"] = batch * args.new / row["mamba_generate_s"]
        row["generate_matches_prefill_decode"] = float(
            np.mean(np.asarray(out)[:, args.prompt :] == toks)
        )
    except Exception as err:
        row["mamba_generate_error"] = f"{type(err).__name__}: {str(err)[:300]}"


def write(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def table(rows) -> str:
    head = ("model", "batch", "mamba prefill s", "mamba decode s", "mamba e2e tok/s",
            "mamba generate tok/s", "tf prefill s", "tf decode s", "tf e2e tok/s",
            "decode x", "e2e x")  # fmt: skip
    keys = ("mamba_prefill_s", "mamba_decode_s", "mamba_e2e_tok_s", "mamba_generate_tok_s",
            "transformer_prefill_s", "transformer_decode_s", "transformer_e2e_tok_s",
            "decode_speedup", "e2e_speedup")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [f"{r[k]:,.3f}" if k in r and r[k] < 100 else f"{r.get(k, 0):,.0f}" for k in keys]
        if "batch" in r:
            lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(vals) + " |")
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('batch', '-')} | error: {r['error'][:120]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="130m,1.4b")
    p.add_argument("--batches", default="64,1", help="in this order (the budget drops the last)")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--attention", default=None, help="prefill attention: xla | cudnn (GPU default)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=1e9,
        help="start no new size or batch after this many seconds",
    )
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batches, args.prompt, args.new, args.reps = "tiny", "1,4", 32, 8, 1
    args.batches = [int(b) for b in args.batches.split(",")]
    platform = jax.devices()[0].platform
    args.attention = args.attention or ("cudnn" if platform == "gpu" else "xla")
    now = datetime.datetime.now(datetime.UTC)
    from mamba_jax.bench_results import git_commit

    commit = args.commit or git_commit(os.path.dirname(os.path.abspath(__file__))) or "unknown"
    args.out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"decode_{now:%Y-%m-%d}.json"
    )
    results = {
        "benchmark": "decode", "device": jax.devices()[0].device_kind, "platform": platform,
        "jax": jax.__version__, "date": now.isoformat(timespec="seconds"), "commit": commit,
        "dtype": "bfloat16", "reps": args.reps, "rows": [], "skipped": [],
    }  # fmt: skip
    t_start = time.perf_counter()
    for size in args.models.split(","):
        try:
            bench_size(size, args, results, t_start)
        except Exception as err:  # a failed check or setup at one size: record, go on
            results["rows"].append({"model": size, "error": f"{type(err).__name__}: {err}"[:400]})
            write(results, args.out)
            print(f"{size}: {results['rows'][-1]['error']}", flush=True)
    results["wall_s"] = time.perf_counter() - t_start
    write(results, args.out)
    print(f"\n{results['device']}, jax {results['jax']}, {results['date']}, commit {commit[:10]}")
    print(table(results["rows"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
