"""mamba-jax: Mamba (selective state spaces) in JAX and Flax NNX, with Pallas GPU kernels."""

import warnings

from mamba_jax.config import MambaConfig
from mamba_jax.generate import generate
from mamba_jax.model import MambaCache, MambaLM
from mamba_jax.scan import selective_scan

# `python -m mamba_jax.generate` runs a module this package has already imported (for the
# `generate` function); runpy's warning about that is harmless here.
warnings.filterwarnings(
    "ignore", r"'mamba_jax\.generate' found in sys\.modules", RuntimeWarning, "runpy"
)

__all__ = [
    "MambaCache",
    "MambaConfig",
    "MambaLM",
    "generate",
    "load_pretrained",
    "save_pretrained",
    "selective_scan",
]


def load_pretrained(path, dtype=None, mesh=None):
    """Loads an HF (state-spaces/mamba-*-hf) or original mamba_ssm checkpoint directory."""
    from mamba_jax.convert import load_pretrained as _load

    return _load(path, dtype=dtype, mesh=mesh)


def save_pretrained(model, path):
    """Writes HF format (config.json + model.safetensors) that transformers' MambaForCausalLM loads."""
    from mamba_jax.convert import save_pretrained as _save

    return _save(model, path)
