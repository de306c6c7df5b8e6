"""Training config: every preset builds, overrides apply, bad keys and values are rejected."""

import glob
import os

import pytest

from mamba_jax.model import abstract_model, count_params
from mamba_jax.training.run_config import Config, config_from_dict, load_config
from tests.conftest import ROOT

PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
# Official parameter counts (tied embedding, vocab padded to 50280), in millions.
OFFICIAL_M = {
    "mamba_130m": 129,
    "mamba_370m": 372,
    "mamba_790m": 793,
    "mamba_1.4b": 1372,
    "mamba_2.8b": 2768,
}


def test_presets_exist():
    names = {os.path.basename(p)[:-5] for p in PRESETS}
    assert {"tiny", *OFFICIAL_M} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p))
def test_preset_builds(path):
    config = load_config(path)
    n = count_params(abstract_model(config.model))  # shapes only, nothing allocated
    name = os.path.basename(path)[:-5]
    if name in OFFICIAL_M:
        assert abs(n / 1e6 - OFFICIAL_M[name]) / OFFICIAL_M[name] < 0.01, (name, n)
        assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32"
        assert (config.train.b1, config.train.b2, config.train.weight_decay) == (0.9, 0.95, 0.1)
        assert config.train.min_lr == 1e-5 and config.train.grad_clip == 1.0
    assert config.train.batch_size % config.train.grad_accum == 0


def test_defaults_and_overrides():
    assert load_config(None) == Config()
    config = load_config(
        os.path.join(ROOT, "configs", "tiny.yaml"),
        [
            "train.steps=7",
            "train.lr=1e-4",
            "checkpoint.dir=/tmp/x",
            "data.tokenizer=null",
            "mesh.data=2",
            "mesh.fsdp=-1",
            "model.remat=true",
        ],
    )
    assert (
        config.train.steps == 7 and config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    )
    assert config.checkpoint.dir == "/tmp/x" and config.data.tokenizer is None
    assert (config.mesh.data, config.mesh.fsdp) == (2, -1) and config.model.remat is True
    assert config.model.d_model == 96  # from the preset, untouched by the overrides


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("trian.steps=3", "trian"),
        ("train.steps=ten", "train.steps"),
        ("train.steps=0", "train.steps"),
        ("train.lr=true", "train.lr"),
        ("train.batch_size=10", "train.grad_accum"),
        ("model.d_model=-4", "d_model"),
        ("model.scan_impl=fast", "scan_impl"),
        ("mesh.data=0", "mesh"),
        ("data.format=csv", "data.format"),
        ("checkpoint.every=0", "checkpoint.every"),
        ("train.time_limit_s=0", "train.time_limit_s"),
        ("train.compilation_cache_dir=' '", "train.compilation_cache_dir"),
        ("model.selective=maybe", "model.selective"),
        ("distributed.mode=maybe", "distributed.mode"),
        ("steps=3", "section.key"),
        ("train.steps", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    extra = ["train.grad_accum=4"] if "batch_size" in override else []
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_config(None, [*extra, override])


def test_missing_config_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent/preset.yaml")


def test_retired_model_keys_of_older_runs():
    """Run configs saved before tie_embeddings was removed still load; a value the model cannot
    honour is refused rather than ignored. scan_layers, once retired too, is a field again, and
    the configs that carry scan_layers: true mean what they did."""
    tree = {"model": {"d_model": 32, "tie_embeddings": True, "scan_layers": True}}
    assert config_from_dict(tree).model.d_model == 32
    assert config_from_dict(tree).model.scan_layers is True
    assert config_from_dict({"model": {"scan_layers": False}}).model.scan_layers is False
    with pytest.raises(ValueError, match="tie_embeddings=False is not supported"):
        config_from_dict({"model": {"tie_embeddings": False}})
