"""Orbax checkpoints of a training run: async saves, keep-N, resume, restore onto another mesh.

A step directory `<dir>/<step>/` holds four items:
    params    the MambaLM parameters (nested dict), each array saved with its shards
    train     optimizer state, step and RNG key data (and, with train.state_passing, the carried
              SSM and conv states)
    data      the Grain iterator state, one file per JAX process
    config    the run's Config as JSON, so a checkpoint can be rebuilt without its YAML

Orbax writes each step into a temporary directory and renames it when every item and every
process has finished, so `latest_step()` only ever sees complete checkpoints: a run killed
mid-save resumes from the one before. Restoring takes the abstract state with the *current*
mesh's shardings, so a checkpoint saved on one mesh shape loads onto another.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import orbax.checkpoint as ocp

from mamba_jax.loading import read_run_config_dict, restore_run_model
from mamba_jax.model import MambaLM
from mamba_jax.training.run_config import CheckpointConfig, Config, config_from_dict

ITEMS = ("params", "train", "data", "config")


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for a restore that lands in place."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _grain_handler():
    import grain

    return grain.checkpoint.CheckpointHandler()


def _train_keys(state: dict) -> tuple[str, ...]:
    """What the "train" item holds: everything but the params."""
    return tuple(k for k in ("opt_state", "step", "rng", "carry") if k in state)


class Checkpointer:
    """A CheckpointManager over `config.dir` with the items above."""

    def __init__(self, config: CheckpointConfig, with_data: bool = True):
        self.config = config
        self.with_data = with_data
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        if with_data:
            handlers["data"] = _grain_handler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            os.path.abspath(config.dir), options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: dict,
        data_iterator=None,
        config: Config | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether one was started."""
        import grain

        args = {
            "params": ocp.args.StandardSave(state["params"]),
            "train": ocp.args.StandardSave({k: state[k] for k in _train_keys(state)}),
            "config": ocp.args.JsonSave(config.to_dict() if config is not None else {}),
        }
        if self.with_data:
            if data_iterator is None:
                raise ValueError("data_iterator is required when the checkpoint holds data state")
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: dict, shardings: dict, data_iterator=None):
        """Restores the state at `step` into `shardings` (any mesh); the iterator in place."""
        import grain

        keys = _train_keys(abstract_state)
        train_abstract = {k: abstract_state[k] for k in keys}
        train_shardings = {k: shardings[k] for k in keys}
        args = {
            "params": ocp.args.StandardRestore(
                _abstract(abstract_state["params"], shardings["params"])
            ),
            "train": ocp.args.StandardRestore(_abstract(train_abstract, train_shardings)),
        }
        if self.with_data and data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {"params": restored["params"], **restored["train"]}

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def read_run_config(directory: str, step: int | None = None) -> tuple[Config, int]:
    """The Config saved with a checkpoint (latest step by default) and that step."""
    tree, step = read_run_config_dict(directory, step)
    return config_from_dict(tree), step


def restore_model(
    checkpoint_dir: str, step: int | None = None, mesh=None
) -> tuple[MambaLM, Config]:
    """Rebuilds the MambaLM of a training run from its latest (or given) checkpoint.

    Returns (model, the run's Config). Parameters land replicated on `mesh` (default: all local
    devices in one data axis), whatever mesh the run was trained on.
    """
    model, step = restore_run_model(checkpoint_dir, step, mesh)
    return model, read_run_config(checkpoint_dir, step)[0]


class PreemptionFlag:
    """Set by SIGTERM (what schedulers send before preempting); the loop saves and exits.

    With several processes, `should_stop` agrees across all of them (any one signalled means all
    stop at the same step), because a save is a collective operation.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self._event.set()

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def should_stop(self, local_reason: bool = False) -> bool:
        """True when this process was signalled (or `local_reason` holds, e.g. a time limit) on
        any process."""
        local = self._event.is_set() or bool(local_reason)
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(jax.numpy.int32(local))
        return bool(flags.max())
