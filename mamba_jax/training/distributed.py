"""Multi-process launch: when and how to call `jax.distributed.initialize`."""

from __future__ import annotations

import os

import jax

from mamba_jax.training.run_config import Config, DistributedConfig


def distributed_wanted(dist: DistributedConfig, environ=os.environ) -> bool:
    """Whether to call jax.distributed.initialize: always with mode on, never with off; with auto
    when a coordinator is given (flag or JAX_COORDINATOR_ADDRESS), when SLURM runs several tasks,
    or when a Cloud TPU slice lists several workers (TPU_WORKER_HOSTNAMES)."""
    if dist.mode != "auto":
        return dist.mode == "on"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return bool(
        dist.coordinator_address is not None
        or environ.get("JAX_COORDINATOR_ADDRESS")
        or int(environ.get("SLURM_NTASKS", "1") or 1) > 1
        or len(hosts) > 1
    )


def init_distributed(config: Config):
    """jax.distributed.initialize from the config, or from the environment (SLURM, Cloud TPU):
    arguments left unset are auto-detected by JAX."""
    dist = config.distributed
    if not distributed_wanted(dist):
        return
    # CPU processes need a collectives backend to talk to each other; GPU/TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if dist.coordinator_address is not None:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes is not None:
        kwargs["num_processes"] = dist.num_processes
    if dist.process_id is not None:
        kwargs["process_id"] = dist.process_id
    if dist.local_device_ids is not None:
        kwargs["local_device_ids"] = [int(i) for i in dist.local_device_ids.split(",")]
    jax.distributed.initialize(**kwargs)
