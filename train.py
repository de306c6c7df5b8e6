"""Trains a Mamba language model: config -> distributed init -> mesh -> model/optimizer -> restore
-> loop (log, eval, checkpoint) -> sample.

    # CPU smoke run, what `make train` and a bare `python train.py` on a CPU run: a 230k-parameter
    # byte-level model on the Python standard library's sources, 1.5 minutes on 2 idle cores
    python train.py --config configs/tiny.yaml
    # any key can be overridden as section.key=value
    python train.py --config configs/tiny.yaml train.steps=400 checkpoint.dir=runs/try
    # 130m on one GPU with a GPT-NeoX tokenizer and your own text
    python train.py --config configs/mamba_130m.yaml data.tokenizer=tokenizer.json \\
        data.train_path='corpus/*.txt' train.grad_accum=16
    # pre-tokenized corpus (flat uint16 file), FSDP over 8 GPUs x 2 tensor-parallel
    python train.py --config configs/mamba_1.4b.yaml data.train_path=train.bin \\
        data.val_path=val.bin mesh.data=1 mesh.fsdp=-1 mesh.tensor=2
    # several hosts: one process per host (or per GPU), see docs/training.md for SLURM / Cloud TPU
    python train.py --config configs/mamba_2.8b.yaml distributed.mode=on

Everything goes under checkpoint.dir (runs/<preset> for a preset): the numbered checkpoint folders,
metrics.jsonl, tensorboard/ and train_summary.json. Run it again with the same checkpoint.dir and
it resumes from the latest complete checkpoint (parameters, optimizer, step, RNG and data
position); a run that already reached train.steps only prints its sample again. SIGTERM,
train.stop_at=N and train.time_limit_s=S each save a checkpoint, then exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import json
import os
import re
import shlex
import shutil
import sys
import textwrap
import time

import jax
import numpy as np
from flax import nnx

from mamba_jax import sharding as shd
from mamba_jax.config import MambaConfig
from mamba_jax.model import count_params
from mamba_jax.sampling import generate
from mamba_jax.training import trainer
from mamba_jax.training.checkpoint import Checkpointer, PreemptionFlag, read_run_config
from mamba_jax.training.data import build_data, check_batch
from mamba_jax.training.distributed import distributed_wanted, init_distributed
from mamba_jax.training.metrics import MetricsWriter, mfu
from mamba_jax.training.run_config import Config, load_config

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_PRESET = "configs/tiny.yaml"  # what a bare `python train.py` trains on a CPU


# ----------------------------------------------------------------------------------------------
# The command line: which preset, and what --help says about presets and keys.


def presets() -> list[str]:
    """configs/*.yaml, relative to the repository root."""
    found = glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def preset_line(path: str) -> str:
    """One line of --help: the preset's own first comment, its model and its batches."""
    with open(os.path.join(ROOT, path)) as f:
        head = re.split(r"[(:,]", f.readline().lstrip("# ").strip())[0].strip()
    c = load_config(os.path.join(ROOT, path))
    task = f"task {c.data.task}, " if c.data.task else ""
    return (
        f"  {path:31s}{head}: {task}d_model {c.model.d_model}, {c.model.n_layer} layers, "
        f"{c.train.steps} steps, batch {c.train.batch_size} x {c.train.seq_len}"
    )


def help_epilog() -> str:
    lines = ["presets (--config):"] + [preset_line(p) for p in presets()]
    lines += [
        "",
        "config sections and keys (override any as section.key=value; see docs/training.md):",
    ]
    for section in dataclasses.fields(Config):
        keys = " ".join(f.name for f in dataclasses.fields(section.default_factory))
        lines.append(
            textwrap.fill(keys, 98, initial_indent=f"  {section.name}: ", subsequent_indent=" " * 4)
        )
    return "\n".join(lines)


def resolve_config_path(path: str | None, overrides: list[str]) -> str:
    """The YAML to read: --config (also found relative to this script), or, without it, the tiny
    preset on a CPU; on an accelerator a bare `python train.py` is an error listing the presets."""
    names = ", ".join(presets())
    if path is None:
        # Decided before jax.distributed.initialize, so probe the backend only when no
        # multi-process launch is wanted (initialize must come before any backend use).
        if distributed_wanted(load_config(None, overrides).distributed):
            raise ValueError(f"no --config given: a multi-process run needs one of {names}")
        backend = jax.default_backend()
        if backend != "cpu":
            raise ValueError(
                f"no --config given: choose a preset for this {backend}, e.g. "
                f"python train.py --config configs/mamba_130m.yaml; presets: {names} "
                "(python train.py --help describes them)"
            )
        print(
            f"no --config given: training {CPU_PRESET}, the CPU preset "
            "(python train.py --help lists the others)",
            flush=True,
        )
        return os.path.join(ROOT, CPU_PRESET)
    if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
        return os.path.join(ROOT, path)
    if not os.path.exists(path):
        close = difflib.get_close_matches(path, presets(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"config file {path!r} does not exist{hint}; presets: {names}")
    return path


def parse_args(argv) -> tuple[Config, str, list[str]]:
    """(the Config, the preset it came from as the user would type it, the overrides)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default=None, help=f"YAML preset (default on a CPU: {CPU_PRESET})"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=400")
    args = parser.parse_args(argv)
    path = resolve_config_path(args.config, args.overrides)
    return load_config(path, args.overrides), args.config or CPU_PRESET, args.overrides


# ----------------------------------------------------------------------------------------------
# What the run tells the user.


class Console:
    """Process 0's messages. While the tqdm bar runs they print above it, never glued onto it."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def print(self, msg: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def start_bar(self, total: int, initial: int):
        from tqdm import tqdm

        if self.enabled:
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None)


def config_summary(config: Config, preset: str, overrides: list[str], n_params: int) -> str:
    """What this run is, in three lines: only what differs from the preset and the defaults."""
    model = [
        f"{f.name}={getattr(config.model, f.name)}"
        for f in dataclasses.fields(MambaConfig)
        if getattr(config.model, f.name) != f.default
    ]
    t = config.train
    return "\n".join(
        [
            f"config: {preset}" + (" with " + " ".join(overrides) if overrides else ""),
            f"model: {n_params:,} parameters; "
            + (" ".join(model) or "MambaConfig()")
            + (" (the rest MambaConfig's defaults)" if model else ""),
            f"plan: {t.steps} steps of {t.batch_size} x {t.seq_len} tokens, peak lr {t.lr:g}; eval "
            f"every {t.eval_every} steps, checkpoint every {config.checkpoint.every}"
            + ("; states carried across windows (train.state_passing)" if t.state_passing else ""),
        ]
    )


def python_command() -> str:
    """How to call this interpreter from here: `python` when that is it (an active venv), else
    its path, e.g. .venv/bin/python."""
    found = shutil.which("python")
    if found and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python"
    rel = os.path.relpath(sys.executable)
    return sys.executable if rel.startswith("..") else rel


def where_things_are(config: Config, stopped: str | None) -> str:
    """The run directory's contents and the commands to try next."""
    d, tc = config.checkpoint.dir, config.train
    steps = sorted(int(n) for n in os.listdir(d) if n.isdigit())
    py = python_command()
    rows = [
        ("checkpoints", ", ".join(os.path.join(d, str(s)) for s in steps) or "none"),
        ("metrics", os.path.join(d, "metrics.jsonl")),
    ]
    if tc.tensorboard:
        rows.append(("TensorBoard", os.path.join(d, "tensorboard")))
    if os.path.exists(os.path.join(d, "train_summary.json")):
        rows.append(("summary", os.path.join(d, "train_summary.json")))
    lines = [f"run directory {d}:"] + [f"  {k:12s} {v}" for k, v in rows] + ["next:"]
    if stopped is not None or (steps and steps[-1] < tc.steps):
        lines.append("  resume       run the same command again")
    if config.data.task is None:
        prompt = shlex.quote(tc.sample_prompt)
        lines.append(
            f"  sample       {py} -m mamba_jax.generate --model {shlex.quote(d)} "
            f"--prompt {prompt} --max-new-tokens 200"
        )
    lines.append(f"  plot         {py} -m mamba_jax.training.plot {shlex.quote(d)}")
    return "\n".join(lines)


def sample(graphdef, params, tokenizer, config: Config, rng_data) -> str:
    model = nnx.merge(graphdef, params)
    prompt = tokenizer.encode(config.train.sample_prompt) or [tokenizer.eos_id]
    rng = jax.random.wrap_key_data(np.asarray(rng_data))
    out = generate(
        model,
        np.asarray([prompt], np.int32),
        config.train.sample_tokens,
        temperature=0.8,
        top_p=0.95,
        rng=rng,
    )
    return tokenizer.decode(np.asarray(out[0]).tolist())


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    config, preset, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    init_distributed(config)
    if config.train.compilation_cache_dir:
        cache_dir = os.path.expanduser(config.train.compilation_cache_dir)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    mesh = shd.make_mesh(config.mesh)
    check_batch(config, mesh)
    tc, pid, nproc = config.train, jax.process_index(), jax.process_count()
    out = Console(pid == 0)
    out.print(
        f"devices: {jax.device_count()} ({jax.devices()[0].device_kind}), processes: "
        f"{nproc}, mesh: {dict(mesh.shape)}"
    )

    # Data: every process reads its own slice of each global batch.
    data_iter, val, tokenizer, bytes_per_token = build_data(config, pid, nproc, out.print)

    # Model and optimizer state, built sharded, or restored from the latest complete checkpoint.
    tx = trainer.make_optimizer(tc)
    ckpt = Checkpointer(config.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None and not config.checkpoint.resume:
        raise ValueError(
            f"checkpoint.dir={config.checkpoint.dir!r} already holds checkpoints (latest step "
            f"{latest}) and checkpoint.resume=false: pick a new checkpoint.dir or delete it"
        )
    carry_rows = tc.batch_size if tc.state_passing else None  # carried states, one per row
    if latest is not None:
        saved = read_run_config(config.checkpoint.dir, latest)[0].train
        if saved.state_passing != tc.state_passing:
            raise ValueError(
                f"checkpoint.dir={config.checkpoint.dir!r} was trained with "
                f"train.state_passing={str(saved.state_passing).lower()}: resume it with the "
                "same setting, or start a new checkpoint.dir"
            )
        graphdef, abstract, shardings = trainer.train_state_shardings(
            config.model, tx, mesh, carry_rows
        )
        state = ckpt.restore(latest, abstract, shardings, data_iter)
        out.print(f"resumed from {config.checkpoint.dir} step {latest}")
    else:
        graphdef, state, shardings = trainer.init_state(config.model, tx, mesh, tc.seed, carry_rows)
    n_params = count_params(state["params"])
    out.print(config_summary(config, preset, overrides, n_params))
    out.print(
        f"run directory: {config.checkpoint.dir} (checkpoints, metrics.jsonl, "
        f"{'tensorboard/, ' if tc.tensorboard else ''}train_summary.json)"
    )
    train_step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
    eval_step = trainer.make_eval_step(graphdef, shardings, mesh)

    start = int(state["step"])
    writer = MetricsWriter(config.checkpoint.dir, tc.tensorboard, start_step=start)
    preempt = PreemptionFlag().install()
    last_step = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    if start >= last_step:
        key = "train.steps" if last_step == tc.steps else "train.stop_at"
        out.print(
            f"the checkpoint is at step {start} >= {key}={last_step}: nothing to train (raise "
            f"{key} to continue, or use a new checkpoint.dir to start over)"
        )
    elif tc.progress:
        out.start_bar(tc.steps, start)

    loop_start = last_time = time.perf_counter()
    last_logged = start
    metrics, saved_at, stopped = {}, None, None
    guard = trainer.NonfiniteGuard(tc.max_nonfinite_steps)  # skipped updates, and when to stop
    for step in range(start, last_step):
        batch = trainer.global_batch(next(data_iter), mesh)
        state, step_metrics = train_step(state, batch)
        done = step + 1
        if step == start:  # the first step waits for the compiler: say how long it took
            jax.block_until_ready(step_metrics)
            seconds = time.perf_counter() - loop_start
            where = (f"compiling or loading from {tc.compilation_cache_dir}"
                     if tc.compilation_cache_dir else "compiling")  # fmt: skip
            out.print(f"step {done} took {seconds:.1f} s, {where} included")
        # Agreed by all processes, so that they all leave at the same step.
        time_up = tc.time_limit_s is not None and time.perf_counter() - loop_start > tc.time_limit_s
        if preempt.should_stop(time_up):
            stopped = "time limit" if time_up else "SIGTERM"
        stopped = stopped or guard.update(step_metrics)
        final = done == last_step or stopped is not None
        if done % tc.log_every == 0 or final:
            metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            metrics["nonfinite_steps"] = guard.total
            now = time.perf_counter()
            tokens = (done - last_logged) * tc.batch_size * tc.seq_len
            metrics["tokens_per_sec"] = tokens / max(now - last_time, 1e-9)
            metrics["mfu"] = mfu(n_params, metrics["tokens_per_sec"], jax.device_count())
            last_time, last_logged = now, done
            # No eval when stopping early: a preempted job has seconds left, not minutes.
            evaluated = done % tc.eval_every == 0 or (final and stopped is None)
            if evaluated:
                with_accuracy = config.data.task is not None
                metrics.update(
                    trainer.eval_loss(
                        eval_step, state["params"], val, mesh, bytes_per_token, with_accuracy
                    )
                )
                last_time = time.perf_counter()  # keep eval out of the throughput
            writer.write(done, metrics)
            if out.bar is not None:
                out.bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_sec']:,.0f}"
                )
                if evaluated and not final:  # the final metrics print below the bar
                    evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
                    out.print(
                        f"step {done}: {format_metrics(evals)} (train loss {metrics['loss']:.4g})"
                    )
            else:
                out.print(f"step {done}: " + format_metrics(metrics))
        if out.bar is not None:
            out.bar.update(1)
        if stopped is not None:
            out.print(f"{stopped}: saving step {done} and exiting")
            ckpt.save(done, state, data_iter, config, force=True)
            saved_at = done
            break
        if done % config.checkpoint.every == 0:
            ckpt.save(done, state, data_iter, config)
            saved_at = done

    train_seconds = time.perf_counter() - loop_start
    end = int(state["step"])
    if saved_at != end and end > start:
        ckpt.save(end, state, data_iter, config, force=True)
    ckpt.close()
    preempt.uninstall()
    had_bar = out.bar is not None
    out.close_bar()
    if metrics and had_bar:  # without the bar the loop already printed it
        out.print(f"step {end}: " + format_metrics(metrics))

    if end == tc.steps and tc.sample_tokens > 0 and tokenizer is not None:
        text = sample(graphdef, state["params"], tokenizer, config, state["rng"])
        out.print(f"--- sample ({tc.sample_tokens} tokens) ---\n{text}\n---")
        writer.text("sample", text, end)
    writer.close()
    summary = {
        "step": end,
        "start_step": start,
        "stopped": stopped,
        "train_seconds": round(train_seconds, 2),
        **metrics,
    }
    if pid == 0 and end > start:  # a run with nothing to train keeps the last summary
        with open(os.path.join(config.checkpoint.dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    out.print(where_things_are(config, stopped))
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad configuration or data: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: steps since the last checkpoint are lost; the same command resumes "
            "from that checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        # Leave at once: a normal interpreter exit would wait on (and then abort in) the data
        # loader's and the async checkpointer's threads. Orbax removes an unfinished save's
        # temporary folder when the next run starts.
        os._exit(130)
