"""mamba-jax: Mamba (selective state spaces) in JAX and Flax NNX, with Pallas GPU kernels."""

import sys
import types

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaCache, MambaLM
from mamba_jax.sampling import generate
from mamba_jax.scan import selective_scan

__all__ = [
    "MambaCache",
    "MambaConfig",
    "MambaLM",
    "generate",
    "load_model",
    "load_pretrained",
    "save_pretrained",
    "selective_scan",
]


def load_pretrained(path, dtype=None, mesh=None):
    """Loads an HF (state-spaces/mamba-*-hf) or original mamba_ssm checkpoint directory."""
    from mamba_jax.convert import load_pretrained as _load

    return _load(path, dtype=dtype, mesh=mesh)


def load_model(path, dtype=None, mesh=None):
    """Loads an HF or mamba_ssm checkpoint, a train.py run directory or one of its step folders."""
    from mamba_jax.loading import load_model as _load

    return _load(path, dtype=dtype, mesh=mesh)


def save_pretrained(model, path):
    """Writes HF format (config.json + model.safetensors) that transformers' MambaForCausalLM loads."""
    from mamba_jax.convert import save_pretrained as _save

    return _save(model, path)


class _Package(types.ModuleType):
    """`mamba_jax.generate` is the sampling function, and `python -m mamba_jax.generate` the
    command line, a submodule of the same name. Importing a submodule makes it an attribute of
    its package; this keeps the function there instead. The command's module stays importable
    as usual (`from mamba_jax.generate import main`)."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
