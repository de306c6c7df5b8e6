"""Two JAX processes x two CPU devices on localhost (gloo collectives) train, save and resume, and
match one process training on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from mamba_jax.training.distributed import distributed_wanted
from mamba_jax.training.run_config import DistributedConfig
from tests.conftest import ROOT, complete_steps, losses, run_train
from tests.conftest import train_args as args


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(argv, devices, extra_env=None):
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **(extra_env or {}),
    )
    return subprocess.Popen(
        [sys.executable, "train.py", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run_pair(tmp_path, ckpt, stop_at):
    port = _free_port()
    procs = [
        _launch(
            args(
                tmp_path,
                ckpt,
                **{
                    "train.steps": 6,
                    "train.stop_at": stop_at,
                    "checkpoint.every": 2,
                    "distributed.coordinator_address": f"localhost:{port}",
                    "distributed.num_processes": 2,
                    "distributed.process_id": pid,
                },
            ),
            devices=2,
        )
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def test_two_processes_train_save_and_resume(tmp_path, assert_close):
    ckpt, reference = tmp_path / "multi", tmp_path / "single"
    outs = _run_pair(tmp_path, ckpt, stop_at=4)
    assert "devices: 4 (cpu), processes: 2" in outs[0]
    assert complete_steps(ckpt) == [2, 4]
    # One Grain state file per process: each reads its own half of every batch.
    data_dir = os.path.join(ckpt, "4", "data")
    assert len([f for f in os.listdir(data_dir) if f.startswith("process_")]) == 2, data_dir
    states = [
        json.load(open(os.path.join(data_dir, f)))
        for f in sorted(os.listdir(data_dir))
        if f.startswith("process_")
    ]
    assert len(states) == 2

    outs = _run_pair(tmp_path, ckpt, stop_at=6)
    assert f"resumed from {ckpt} step 4" in outs[0]
    assert complete_steps(ckpt)[-1] == 6
    run_train(args(tmp_path, reference, **{"train.steps": 6}))  # one process, 8 devices
    multi, single = losses(ckpt), losses(reference)
    assert sorted(multi) == sorted(single) == list(range(1, 7))
    # The global batch assembled from both processes equals the one-process batch, so the losses
    # agree (up to the order of cross-process sums).
    assert_close(
        np.asarray([multi[s] for s in range(1, 7)]), np.asarray([single[s] for s in range(1, 7)])
    )


def test_distributed_init_is_wanted_only_when_the_environment_says_so():
    auto = DistributedConfig()
    assert not distributed_wanted(auto, {})
    assert not distributed_wanted(auto, {"SLURM_NTASKS": "1"})
    assert distributed_wanted(auto, {"SLURM_NTASKS": "4"})
    assert distributed_wanted(auto, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert distributed_wanted(auto, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
    assert not distributed_wanted(auto, {"TPU_WORKER_HOSTNAMES": "localhost"})
    assert distributed_wanted(DistributedConfig(coordinator_address="h:1"), {})
    assert distributed_wanted(DistributedConfig(mode="on"), {})
    assert not distributed_wanted(DistributedConfig(mode="off"), {"SLURM_NTASKS": "4"})
