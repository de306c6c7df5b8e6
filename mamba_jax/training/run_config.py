"""A training run's configuration: the model, data, optimisation, mesh, checkpoints and launch.

YAML presets in configs/ list only what differs from these defaults; `section.key=value`
overrides on the command line are applied on top. Every section is a frozen dataclass that
rejects unknown keys and ill-typed values with a one-line message.
"""

from __future__ import annotations

import dataclasses
import difflib

from mamba_jax.config import MambaConfig, MeshConfig
from mamba_jax.loading import drop_retired_model_keys


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. With `train_path` unset the corpus is the running Python's stdlib."""

    # A text file, glob, directory or token file (.bin); several may be comma-separated.
    train_path: str | None = None
    val_path: str | None = None  # None: split off the training corpus (by file for text)
    format: str = "auto"  # auto | text | tokens ("tokens" = a flat uint16/uint32 memmap)
    token_dtype: str = "uint16"
    tokenizer: str | None = None  # None: bytes (vocab 257); else a tokenizer.json path
    val_fraction: float = 0.05
    seed: int = 0
    max_files: int | None = None  # cap on text files read (a quick way to shrink the corpus)
    task: str | None = None  # a synthetic task of mamba_jax.tasks instead of a corpus
    # How packed windows treat document boundaries: "reset" gives each window its segment ids
    # (a new segment at every end-of-text token), so the scan's state and the conv window
    # restart there and documents never see each other; "none" lets state flow across them.
    packing: str = "reset"

    def __post_init__(self):
        _check_choice("data.format", self.format, ("auto", "text", "tokens"))
        _check_choice("data.packing", self.packing, ("reset", "none"))
        if self.task is not None:
            from mamba_jax.training.tasks import TASKS

            _check_choice("data.task", self.task, TASKS)
        _check_choice("data.token_dtype", self.token_dtype, ("uint16", "uint32"))
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(f"data.max_files must be positive or null, got {self.max_files}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the loop. `batch_size` is global (all processes), in sequences."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step; each is batch_size / grad_accum
    lr: float = 1e-3  # peak, after linear warmup
    min_lr: float = 1e-5  # cosine floor (paper: 1e-5)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4
    # Leave the loop (with a checkpoint) after this step, e.g. to fit a job's time limit; the
    # schedule still spans `steps`, and the next run resumes where this one stopped.
    stop_at: int | None = None
    # Likewise after this many seconds of training (measured from the first step); all
    # processes stop at the same step. For runs that must fit a fixed time budget.
    time_limit_s: float | None = None
    # A step with a non-finite loss or gradient is skipped (params and optimizer state kept);
    # this many in a row stop the run with a checkpoint.
    max_nonfinite_steps: int = 10
    sample_tokens: int = 200  # generated at the end; 0 turns the sample off
    sample_prompt: str = "def "
    tensorboard: bool = True
    progress: bool = True
    # Truncated backprop through time: each batch row reads its own contiguous lane of the
    # corpus, window after window, and starts each step from the SSM and conv states the
    # previous step ended with (no gradient through them; zero where a document starts). The
    # carried states are part of the checkpoint. Needs a text or token corpus (no data.task).
    state_passing: bool = False
    # JAX's persistent compilation cache (jax_compilation_cache_dir): a rerun, a resumed run or
    # another run of the same model and shapes loads the compiled train step from here instead
    # of compiling it again. "~" is expanded; null turns it off.
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                     "max_nonfinite_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"train.stop_at must be >= 1 or null, got {self.stop_at}")
        if self.compilation_cache_dir is not None and not str(self.compilation_cache_dir).strip():
            raise ValueError("train.compilation_cache_dir must be a directory or null, got ''")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"train.time_limit_s must be > 0 or null, got {self.time_limit_s}")
        for name in ("warmup_steps", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of "
                f"train.grad_accum={self.grad_accum}"
            )
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= train.min_lr <= train.lr, got {self.min_lr=} {self.lr=}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "runs/default"
    every: int = 500  # steps between saves; a save also happens at the end and on SIGTERM
    keep: int = 3
    async_save: bool = True
    resume: bool = True  # start from the latest complete checkpoint in `dir` when there is one

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError(
                f"checkpoint.every and checkpoint.keep must be >= 1, got {self.every}, {self.keep}"
            )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """`jax.distributed.initialize` arguments. mode auto: initialise when a coordinator address
    is given or SLURM reports several tasks; on: always (JAX auto-detects SLURM and Cloud TPU
    when the addresses are left unset); off: single process."""

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: str | None = None  # e.g. "0,1"; None lets JAX decide

    def __post_init__(self):
        _check_choice("distributed.mode", self.mode, ("auto", "on", "off"))


@dataclasses.dataclass(frozen=True)
class Config:
    model: MambaConfig = dataclasses.field(default_factory=MambaConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        if self.train.state_passing and self.data.task is not None:
            raise ValueError(
                f"train.state_passing=true streams a corpus window after window, but "
                f"data.task={self.data.task!r} draws independent sequences: set data.task=null "
                "or train.state_passing=false"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _coerce(key: str, value, annotation: str):
    """Checks `value` against a field's annotation string ("int", "float | None", ...)."""
    kinds = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{key} may not be null (expected {annotation})")
    for kind in kinds:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "float" and isinstance(value, str):
            # YAML 1.1 reads exponent-only literals such as 1e-4 as strings.
            try:
                return float(value)
            except ValueError:
                pass
        if kind == "str" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{key} expects {annotation}, got {value!r} ({type(value).__name__})")


def config_from_dict(tree: dict) -> Config:
    """Builds a Config from nested dicts, rejecting unknown sections/keys and ill-typed values."""
    if not isinstance(tree, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    sections = {}
    known = [f.name for f in dataclasses.fields(Config)]
    for name in tree:  # an unknown section is reported before any key inside it
        if name not in known:
            raise ValueError(
                f"unknown config section {name!r}{_did_you_mean(name, known)}; "
                f"sections: {', '.join(known)}"
            )
    for section_field in dataclasses.fields(Config):
        section_cls = section_field.default_factory
        values = tree.get(section_field.name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {section_field.name!r} must be a mapping")
        if section_field.name == "model":
            values = drop_retired_model_keys(values, "model")
        fields = {f.name: f for f in dataclasses.fields(section_cls)}
        kwargs = {}
        for key, value in values.items():
            dotted = f"{section_field.name}.{key}"
            if key not in fields:
                raise ValueError(
                    f"unknown config key {dotted!r}{_did_you_mean(key, fields, section_field.name + '.')}; "
                    f"{section_field.name} keys: {', '.join(sorted(fields))}"
                )
            kwargs[key] = _coerce(dotted, value, str(fields[key].type))
        try:
            sections[section_field.name] = section_cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"config section {section_field.name!r}: {err}") from err
    return Config(**sections)


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings (values parsed as YAML) applied onto a nested dict copy."""
    import yaml

    tree = {k: dict(v or {}) for k, v in tree.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"override key {dotted!r} must look like section.key")
        value = yaml.safe_load(raw) if raw.strip() else None
        tree.setdefault(parts[0], {})[parts[1]] = value
    return tree


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Reads a YAML preset (or the defaults when `path` is None) and applies dotted overrides."""
    import yaml

    tree = {}
    if path is not None:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path!r} does not exist") from None
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of sections")
    return config_from_dict(apply_overrides(tree, list(overrides)))
