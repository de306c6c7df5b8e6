"""One loader for every kind of model directory: `load_model(path, dtype=None, mesh=None)`.

A directory is one of:
    pretrained   config.json with model.safetensors or pytorch_model.bin: an HF
                 (state-spaces/mamba-*-hf) or original mamba_ssm checkpoint (see `convert.py`)
    training run the checkpoint.dir of `train.py`: numbered Orbax step folders (the latest is read)
    one step     one numbered step folder of such a run

A training step folder holds the items `params` (the MambaLM parameters) and `config` (the run's
configuration as JSON, whose "model" section is a MambaConfig); this module reads those two with
Orbax and nothing else, so loading a model never imports the training code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mamba_jax.config import MambaConfig, MeshConfig
from mamba_jax.convert import dtype_name, is_pretrained_dir, load_pretrained
from mamba_jax.model import MambaLM, abstract_model, with_config

# Keys that old run configs carry and MambaConfig no longer has, with the only value they may hold.
_RETIRED_MODEL_KEYS = {"tie_embeddings": True}


def model_config_from_dict(tree: dict, source: str = "model config") -> MambaConfig:
    """A MambaConfig from a dict of its fields (a run config's "model" section); unknown keys
    are refused with the list of known ones."""
    if not isinstance(tree, dict):
        raise ValueError(f"{source} must be a mapping, got {type(tree).__name__}")
    known = {f.name for f in dataclasses.fields(MambaConfig)}
    kwargs = drop_retired_model_keys(tree, source)
    for key in kwargs:
        if key not in known:
            raise ValueError(f"{source}: unknown key {key!r}; known: {sorted(known)}")
    return MambaConfig(**kwargs)


def drop_retired_model_keys(tree: dict, source: str = "model config") -> dict:
    """`tree` without the keys older configs carry and MambaConfig no longer has; refuses a
    retired key whose value the model cannot honour (tie_embeddings=false, say)."""
    out = {}
    for key, value in tree.items():
        if key in _RETIRED_MODEL_KEYS:
            if value != _RETIRED_MODEL_KEYS[key]:
                raise ValueError(
                    f"{source}: {key}={value!r} is not supported (only "
                    f"{_RETIRED_MODEL_KEYS[key]!r}, which is what the model always does)"
                )
            continue
        out[key] = value
    return out


def _is_step(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit()


def is_training_dir(path: str) -> bool:
    """Orbax step folders (digits) or the run's metrics.jsonl mark a train.py checkpoint dir."""
    names = os.listdir(path)
    steps = [n for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n))]
    return bool(steps) or "metrics.jsonl" in names or "_CHECKPOINT_METADATA" in names


def split_run_path(path: str) -> tuple[str, int | None] | None:
    """(run directory, step or None for the latest) when `path` is a training run or one of its
    step folders; None otherwise."""
    parent = os.path.dirname(os.path.normpath(path))
    if _is_step(path) and os.path.isdir(parent) and is_training_dir(parent):
        return parent, int(os.path.basename(os.path.normpath(path)))
    if is_training_dir(path):
        return path, None
    return None


def _is_read_only_notice(record: logging.LogRecord) -> bool:
    """False for Orbax's 'Given directory is read only' warning, which it logs whenever a manager
    is opened with read_only=True (what loading asks for: never write into a model directory),
    whether or not the directory is writable. Every other record passes."""
    return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice():
    logger = logging.getLogger("absl")  # absl.logging, which Orbax uses, logs through this one
    logger.addFilter(_is_read_only_notice)
    try:
        yield
    finally:
        logger.removeFilter(_is_read_only_notice)


def _manager(directory: str, items: tuple[str, ...]) -> ocp.CheckpointManager:
    handlers = {
        "config": ocp.JsonCheckpointHandler(),
        "params": ocp.StandardCheckpointHandler(),
    }
    with _quiet_read_only_notice():
        return ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                read_only=True, save_interval_steps=0, create=False
            ),
            item_handlers={k: handlers[k] for k in items},
        )


def read_run_config_dict(directory: str, step: int | None = None) -> tuple[dict, int]:
    """The run configuration saved with a checkpoint (latest step by default), as a dict of
    sections, and that step."""
    manager = _manager(directory, ("config",))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no complete checkpoint under {directory!r}")
        tree = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return tree["config"], step


def restore_run_model(directory: str, step: int | None = None, mesh=None) -> tuple[MambaLM, int]:
    """The MambaLM of a training run at `step` (default: the latest complete one), and the step.

    Parameters land replicated on `mesh` (default: all local devices), whatever mesh the run was
    trained on."""
    from mamba_jax import sharding as shd

    tree, step = read_run_config_dict(directory, step)
    config = model_config_from_dict(tree.get("model", {}), f"{directory} step {step} model config")
    graphdef, abstract = nnx.split(abstract_model(config))
    params = nnx.to_pure_dict(abstract)
    if mesh is None:
        mesh = shd.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices())
    rep = shd.replicated(mesh)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)
    manager = _manager(directory, ("params",))
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        )["params"]
    finally:
        manager.close()
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract), step


def load_model(path, dtype=None, mesh=None) -> MambaLM:
    """Loads a pretrained checkpoint (HF or mamba_ssm), a training run (its latest step) or one
    step folder of a run. `dtype` casts parameters and activations (A_log, D and the dt bias stay
    float32); `mesh` places a pretrained checkpoint's parameters by the sharding rules and
    replicates a training run's on it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path must be a model directory, got {path!r}")
    if is_pretrained_dir(path):
        return load_pretrained(path, dtype=dtype, mesh=mesh)
    run = split_run_path(path)
    if run is None:
        raise ValueError(
            f"{path!r} is neither an HF/mamba_ssm checkpoint (config.json with model.safetensors "
            "or pytorch_model.bin) nor a training run directory (numbered step folders)"
        )
    model, _ = restore_run_model(*run, mesh=mesh)
    if dtype is None:
        return model
    name = dtype_name(dtype)
    return with_config(model, dtype=name, param_dtype=name)
