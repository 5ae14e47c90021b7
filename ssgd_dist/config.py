"""Typed run configuration: packaged or user YAML, plus dotted ``--set`` overrides.

Every knob the paper's abstract leaves open is a field here with a documented default, so a run's
``config.yaml`` states the whole experiment. Unknown keys are errors (typos must not silently fall
back to a default), and every error names the field, the bad value (cut to about 80 characters) and what
is allowed. Values are strict where YAML is loose: a number is a finite number (not text, not true/false)
within float32 / int64, a boolean is true or false, a path has no NUL and no over-long part. YAML itself
is read by ``safe_yaml`` (bounded: size, depth, no aliases, no duplicate keys, YAML 1.2 scalars).
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from . import safe_yaml, usercode
from .errors import ConfigError
from .safe_yaml import clip, shown

FLOAT32_MAX = 3.4028234663852886e38  # the models run in float32 or narrower: a larger factor overflows there
INT64_LIMIT = 2**63  # integers reach torch (seeds, sizes, steps) as int64
MAX_PROBLEMS = 5  # validation problems listed in one message; the rest are counted
PATH_MAX, NAME_MAX = 4096, 255  # bytes of a path and of one of its parts (Linux)


def _plain(value: Any, annotation: Any) -> Any:
    """Refuse what pydantic's lax mode would coerce: text or true/false where a number is meant ("010" would
    be 10, true would be 1), anything but true/false where a boolean is meant ("yes", "off", 1), and numbers
    outside int64 / float32. Lists and tuples are checked element by element."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _plain(value, args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return value if value is None or len(kinds) != 1 else _plain(value, kinds[0])
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if origin is list or args[-1:] == (Ellipsis,) else args
        for item, kind in zip(value, items):
            _plain(item, kind)
        return value
    if annotation is bool and not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be true or false")
    if annotation in (int, float):
        kind = "a valid integer" if annotation is int else "a valid number"
        if isinstance(value, bool):
            raise PydanticCustomError("number_type", f"Input should be {kind}, not true/false")
        if isinstance(value, str):
            raise PydanticCustomError("number_type", f"Input should be {kind} (decimal, unquoted), not text")
        if isinstance(value, int) and not -INT64_LIMIT <= value < INT64_LIMIT:
            raise PydanticCustomError("int64_range", "Input should fit in int64 (-2**63 <= value < 2**63)")
        if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise PydanticCustomError("float32_range", "Input should be within the float32 range (|value| <= 3.4e38)")
    return value


def _path(value: str | None) -> str | None:
    """A directory name the OS can open: no NUL, at most PATH_MAX bytes, every part at most NAME_MAX bytes."""
    if value is None:
        return value
    if "\0" in value:
        raise PydanticCustomError("path", "a path cannot contain a NUL character")
    encoded = value.encode("utf-8", "surrogateescape")
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise PydanticCustomError(
            "path", f"a path of at most {PATH_MAX} bytes, each part between slashes at most {NAME_MAX}"
        )
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, value: Any, info: ValidationInfo) -> Any:
        return _plain(value, cls.model_fields[info.field_name].annotation)


class NoiseConfig(_Section):
    alpha: float = Field(0.3, ge=0, description="relative noise magnitude: sigma_i = alpha * scale_i")
    distribution: Literal["rademacher", "sphere", "gaussian", "uniform"] = "rademacher"
    scale: Literal["layer_rms", "filter_norm", "elementwise", "absolute"] = "layer_rms"
    targets: Literal["weights", "all"] = "weights"
    schedule: Literal["constant", "warmup", "cosine"] = "constant"
    schedule_fraction: float = Field(0.05, ge=0, le=1, description="warm-up length as a fraction of the run")
    restore: Literal["copy", "regenerate"] = Field(
        "copy",
        description="how w is restored after the noisy passes: 'copy' keeps one copy of the perturbed "
        "tensors and restores bit-for-bit; 'regenerate' keeps none and draws the noise again to undo it "
        "(restored to within rounding; docs/performance.md). SAM always copies.",
    )

    @model_validator(mode="after")
    def _check_restore(self) -> NoiseConfig:
        if self.restore == "regenerate" and self.scale == "elementwise":
            raise ValueError(
                "noise.restore = regenerate: noise scaled by |w| (noise.scale = elementwise) cannot be undone "
                "without a copy of w; use noise.scale=layer_rms, filter_norm or absolute, or noise.restore=copy"
            )
        return self


class SSGDConfig(_Section):
    batch_split: Literal["halves", "full", "paired"] = "halves"


class SAMConfig(_Section):
    rho: float = Field(0.05, ge=0, description="radius of SAM's adversarial perturbation")


class NSOConfig(_Section):
    """Noise stability optimization (Zhang, Li, Ju): Gaussian noise from ``noise.alpha`` / ``scale`` / ``targets``."""

    num_samples: int = Field(1, ge=1, le=64, description="noise samples k per step, each evaluated at w+n and w-n")
    clean_pass: bool = Field(False, description="also take the gradient at w (NSO's nso_lam > 0)")
    clean_weight: float = Field(
        0.5, gt=0, lt=1, description="clean_pass: weight of the gradient at w; the 2k noisy ones share the rest"
    )


class RWPConfig(_Section):
    """Random weight perturbation (Li et al.): filter-wise Gaussian noise, std gamma * ||filter||."""

    gamma: float = Field(0.01, ge=0, description="noise std relative to each output filter's L2 norm")
    mix: float = Field(0.5, ge=0, le=1, description="weight of the perturbed gradient (RWP's --alpha)")
    split: Literal["passes", "ranks"] = Field(
        "passes",
        description="passes: a clean and a perturbed pass on the two halves of the global batch (world-size "
        "invariant); ranks: the original form, even ranks clean, odd ranks perturbed (even world size)",
    )


MODEL_NAMES = ("mlp", "cnn1d", "resnet20", "resnet32", "resnet56", "vgg16_bn", "wrn16_4")
DATA_NAMES = ("mnist1d", "digits", "synthetic", "cifar10", "cifar100", "imagefolder")
LOSS_NAMES = ("cross_entropy",)


def _builtin_or_import(key: str, builtins: tuple[str, ...]) -> Callable[[str], str]:
    """A validator for a ``*.name``: a built-in name, or an import path, resolved right here so that one that
    does not resolve fails while the config is read, before any process starts (docs/own-model-and-data.md)."""

    def check(value: str) -> str:
        if value in builtins:
            return value
        if usercode.is_import_path(value):
            usercode.resolve(value, key)
            return value
        hint = difflib.get_close_matches(value, builtins, n=1)
        raise PydanticCustomError(
            "name",
            f"Input should be one of {', '.join(builtins)}, or an import path package.module:attribute"
            + (f" (did you mean '{hint[0]}'?)" if hint else ""),
        )

    return check


class ModelConfig(_Section):
    name: str = Field("mlp", description=f"one of {', '.join(MODEL_NAMES)}, or package.module:factory")
    options: dict[str, Any] = Field(default_factory=dict, description="free-form, for a model factory of your own")
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [256, 256], max_length=64, description="MLP hidden widths (each 1..65536, at most 64)"
    )
    batchnorm: bool = Field(
        True, description="cnn1d: BatchNorm after each convolution (the CIFAR models always have it)"
    )
    bn_mode: Literal["local", "sync", "ghost"] = Field(
        "local",
        description="which samples a BatchNorm forward normalises together: each rank's own (local), every "
        "rank's samples of the same forward (sync), or fixed ghost batches of the global batch (ghost); "
        "sync and ghost make a BatchNorm model world-size invariant (docs/methods.md)",
    )
    bn_ghost_batch: int | None = Field(None, ge=2, description="bn_mode ghost: samples per ghost batch")

    _check_name = field_validator("name")(_builtin_or_import("model.name", MODEL_NAMES))

    @model_validator(mode="after")
    def _check_ghost(self) -> ModelConfig:
        if self.bn_mode == "ghost" and self.bn_ghost_batch is None:
            raise ValueError(
                "model.bn_mode = ghost: needs model.bn_ghost_batch, the samples per ghost batch (e.g. 32); "
                "it must divide every rank's share of each forward"
            )
        return self

    @property
    def has_batchnorm(self) -> bool:
        return self.name != "mlp" and (self.name != "cnn1d" or self.batchnorm)


class DataConfig(_Section):
    name: str = Field("mnist1d", description=f"one of {', '.join(DATA_NAMES)}, or package.module:factory")
    options: dict[str, Any] = Field(
        default_factory=dict, description="free-form, for imagefolder or a data factory of your own"
    )
    batch_size: int = Field(2000, ge=1, description="global batch size, summed over all ranks")
    train_samples: int | None = Field(None, ge=1, description="use only the first N training examples")
    num_samples: int = Field(
        10000, ge=100, le=1_000_000, description="MNIST-1D examples generated (80% train); 1M take minutes"
    )
    root: str | None = Field(None, description="directory with the CIFAR binary files")
    cache_dir: str | None = Field(None, description="where generated data sets are cached")
    augment: bool = Field(True, description="random crop + flip for CIFAR")
    eval_batch_size: int = Field(1000, ge=1)

    _check_paths = field_validator("root", "cache_dir")(_path)
    _check_name = field_validator("name")(_builtin_or_import("data.name", DATA_NAMES))


class OptimConfig(_Section):
    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75], description="step schedule, fractions of the run"
    )
    gamma: float = Field(0.1, gt=0, description="step schedule decay factor")
    reference_batch_size: int | None = Field(
        None, ge=1, description="linear scaling: lr is multiplied by batch_size / reference_batch_size"
    )
    clip_grad_norm: float | None = Field(None, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW's two moment decay rates, each in [0, 1)"
    )
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    loss: str = Field(
        "cross_entropy", description="cross_entropy, or package.module:function (outputs, labels) -> mean loss"
    )
    accumulation_steps: int = Field(
        1, ge=1, description="micro-steps per optimizer step: each rank's share of the global batch in k pieces"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0: at every epoch end")
    eval_every: int = Field(1, ge=1, description="epochs between evaluations")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skips: int = Field(
        10, ge=0, description="on_nonfinite=skip stops after this many skipped steps (fp16: this many in a row)"
    )
    log_every: int = Field(
        10, ge=1, description="steps whose loss and gradient norm are read from the device at once (one host sync)"
    )
    num_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads per process")
    progress: bool = True
    bn_recalibrate: bool = Field(
        False, description="recompute BatchNorm running statistics at w (no noise) before each evaluation"
    )
    bn_recalibrate_samples: int = Field(2048, ge=1, description="training examples used by bn_recalibrate")
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="newest checkpoints kept, step-N.pt files or step-N.dcp directories (older ones are deleted)",
    )
    crash_at_step: int | None = Field(
        None, ge=1, description="testing only: the last rank SIGKILLs itself once at this step"
    )
    nan_at_step: int | None = Field(
        None, ge=1, description="testing only: rank 0's inputs are NaN at this step (exercises on_nonfinite)"
    )

    _check_loss = field_validator("loss")(_builtin_or_import("train.loss", LOSS_NAMES))


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(0, ge=0, le=3)
    bf16: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config")


class FSDPConfig(_Section):
    wrap: list[str] = Field(
        default_factory=list,
        description="class names of the modules sharded as one unit each (their parameters are gathered together); "
        "empty: every direct child of the model that holds parameters. The root is always sharded last.",
    )
    checkpoint: Literal["sharded", "full"] = Field(
        "sharded",
        description="sharded: each rank writes its own shards (step-N.dcp/, torch.distributed.checkpoint), and "
        "the run's last checkpoint is also the plain last.pt; full: every checkpoint is gathered to rank 0 "
        "into a plain step-N.pt",
    )


class Config(_Section):
    method: Literal["sgd", "ssgd", "gni", "smoothout", "sam", "nso", "rwp"] = "ssgd"
    seed: int = Field(0, ge=0, lt=INT64_LIMIT, description="0 <= seed < 2**63 (torch takes seed + a stream offset)")
    backend: Literal["auto", "local", "ddp", "deepspeed", "fsdp"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    ssgd: SSGDConfig = Field(default_factory=SSGDConfig)
    sam: SAMConfig = Field(default_factory=SAMConfig)
    nso: NSOConfig = Field(default_factory=NSOConfig)
    rwp: RWPConfig = Field(default_factory=RWPConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)

    @model_validator(mode="after")
    def _check_cross_field(self) -> Config:
        if self.method == "ssgd" and self.ssgd.batch_split == "halves" and self.data.batch_size % 2:
            raise ValueError(
                f"data.batch_size = {self.data.batch_size}: 'halves' splits every batch in two; use an even batch size"
            )
        reference = self.optim.reference_batch_size
        if reference and self.optim.lr * self.data.batch_size / reference > FLOAT32_MAX:
            raise ValueError(
                f"optim.lr = {self.optim.lr:g} scaled by data.batch_size / optim.reference_batch_size = "
                f"{self.data.batch_size} / {reference} is past the float32 range (3.4e38); lower optim.lr or raise "
                "optim.reference_batch_size"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def applicable_dict(self) -> dict[str, Any]:
        """``to_dict`` without the keys that act on nothing in this run (``inapplicable_keys``): what a run's
        ``config.yaml`` shows, and what its identity compares."""
        data = self.to_dict()
        for section, *key in inapplicable_keys(self):
            if key:
                data[section].pop(key[0])
            else:
                data.pop(section)
        return data


def inapplicable_keys(cfg: Config) -> set[tuple[str, ...]]:
    """Keys whose value changes nothing that ``cfg`` runs: another method's section, another backend's,
    ``noise`` for the methods that draw none, a model or data set's keys for another one, BatchNorm keys
    without BatchNorm, another optimizer's or schedule's keys. A factory of the user's own gets its whole
    section (it may read any key)."""
    model, data, optim = cfg.model, cfg.data, cfg.optim
    keys = {(name,) for name in ("ssgd", "sam", "nso", "rwp") if cfg.method != name}
    keys |= {(name,) for name in ("deepspeed", "fsdp") if cfg.backend != name}
    if cfg.method in ("sgd", "sam", "rwp"):
        keys.add(("noise",))
    if cfg.method == "nso" and not cfg.nso.clean_pass:
        keys.add(("nso", "clean_weight"))
    if not usercode.is_import_path(model.name):
        keys |= {("model", "options")}
        keys |= {("model", "hidden")} if model.name != "mlp" else set()
        keys |= {("model", "batchnorm")} if model.name != "cnn1d" else set()
    if not model.has_batchnorm:
        keys |= {("model", "bn_mode"), ("train", "bn_recalibrate"), ("train", "bn_recalibrate_samples")}
    if not model.has_batchnorm or model.bn_mode != "ghost":
        keys.add(("model", "bn_ghost_batch"))
    if not usercode.is_import_path(data.name):
        keys |= {("data", "options")} if data.name != "imagefolder" else set()
        keys |= {("data", "num_samples"), ("data", "cache_dir")} if data.name != "mnist1d" else set()
        keys |= {("data", "root"), ("data", "augment")} if data.name not in ("cifar10", "cifar100") else set()
    keys |= {("optim", "betas")} if optim.name != "adamw" else {("optim", "momentum")}
    keys |= {("optim", "trust_coefficient")} if optim.name != "lars" else set()
    keys |= {("optim", "nesterov")} if optim.name != "sgd" else set()
    keys |= {("optim", "milestones"), ("optim", "gamma")} if optim.schedule != "step" else set()
    return keys


def _packaged_folder(folder: str):
    root = resources.files("ssgd_dist.configs")
    return root / folder if folder else root


def packaged_names(folder: str = "") -> list[str]:
    """The packaged YAML files under ``ssgd_dist/configs/FOLDER``, by name (configs, or ``grids``)."""
    root = _packaged_folder(folder)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")) if root.is_dir() else []


def read_named_yaml(name_or_path: str, what: str, kind: str, folder: str = "") -> tuple[str, Path | None]:
    """The text of a YAML file given by path, or of a packaged one given by name (``kind`` names it in
    errors), read by ``safe_yaml`` (bounded and strict); and the file's path (None when packaged)."""
    path = Path(name_or_path)
    try:
        exists = path.exists()
        is_file = exists and path.is_file()
    except OSError as exc:  # a name too long for the file system, for instance
        raise ConfigError(f"{what}: {exc.strerror or exc}") from None
    if exists or path.suffix in (".yaml", ".yml"):
        if not is_file:
            raise ConfigError(f"{what}: " + ("not a regular file (a directory?)" if exists else "no such file"))
        return safe_yaml.read_text(path, what), path.resolve()
    packaged = _packaged_folder(folder) / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = packaged_names(folder)
        hint = difflib.get_close_matches(name_or_path, names, n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"{what}: not a file and not a packaged {kind}{did_you_mean}; packaged: {', '.join(names) or 'none'}"
        )
    return safe_yaml.decode(packaged.read_bytes(), what), None


def read_config_yaml(name_or_path: str) -> dict[str, Any]:
    """A config file or packaged config as a mapping."""
    what = f"--config {clip(name_or_path)}"
    text, _ = read_named_yaml(name_or_path, what, "config")
    return parse_yaml_mapping(text, what, "keys to values")


def parse_yaml_mapping(text: str, what: str, expected: str) -> dict[str, Any]:
    """A YAML document that must be a mapping (an empty one is ``{}``), read by ``safe_yaml``: no code runs,
    no aliases, bounded size and depth, no duplicate keys, YAML 1.2 scalars; every problem is a one-line
    ``ConfigError`` starting with ``what``."""
    return safe_yaml.load_mapping(text, what, expected)


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _known_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


FREE_FORM = ("deepspeed.extra.", "model.options.", "data.options.")  # sections whose keys are the user's


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b=c`` override; the value is parsed as YAML (by ``safe_yaml``) so numbers, bools and
    lists work; text that is not YAML at all is taken as a string."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    what = f"--set {clip(assignment)}"
    if not sep or not key:
        raise ConfigError(f"{what}: expected KEY=VALUE, e.g. --set noise.alpha=0.3")
    known = _known_keys(Config)
    parts = key.split(".")
    if key not in known and not (key.startswith(FREE_FORM) and all(parts)):
        hint = difflib.get_close_matches(key, known, n=1)
        raise ConfigError(f"{what}: unknown key {shown(key)}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    try:
        value = safe_yaml.load(raw, what) if raw.strip() else None
    except safe_yaml.YAMLRefused as exc:
        quoted = f"--set '{clip(key)}=\"...\"'"
        raise ConfigError(
            f"{what}: invalid YAML: {safe_yaml.describe(exc)}; to pass it as text, quote it: {quoted}"
        ) from None
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def validation_message(exc: ValidationError, known: list[str], field_name: Callable[[str], str] = str) -> str:
    """One line per problem: a validator's own message as it is, else the field, the bad value and what is
    allowed; unknown keys with the closest known one. ``field_name`` turns a dotted key into what the user
    typed (a flag, for instance)."""
    lines = []
    errors = exc.errors()
    for err in errors[:MAX_PROBLEMS]:
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if len(field) > 80:
            field = field[:77] + "..."
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(field, known, n=1)
            lines.append(f"unknown key '{field}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        elif err["type"] == "value_error":
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{field_name(field)} = {shown(err.get('input'))}: {err['msg']}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(lines)


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, _known_keys(Config))) from None


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Resolve a packaged name or a YAML path, apply ``--set`` overrides in order, and validate."""
    return override(read_config_yaml(name_or_path), overrides)


def override(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A config mapping with ``--set`` overrides applied in order, validated."""
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validate(data)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML that reads back the same with ``safe_yaml`` and with plain PyYAML."""
    return safe_yaml.dump(cfg.applicable_dict())


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class BenchOptions(BaseModel):
    """Every option of ``ssgd-dist bench`` with its default; the CLI's flags default to "not given", so
    the defaults live here only. Frozen: the bench derives what depends on the machine into a copy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field("resnet20", description="a packaged model: mlp, cnn1d, resnet20, ...")
    batch_size: int = Field(256, description="global batch, summed over ranks")
    world_size: int = Field(2, description="ranks it spawns: gloo on CPU, NCCL on GPU")
    accumulation_steps: int = Field(1, description="micro-steps per optimizer step, in every variant")
    backend: Literal["ddp", "fsdp"] = Field("ddp", description="every variant's backend (fsdp: sharded, FSDP2)")
    steps: int = Field(20, description="timed steps per variant, interleaved")
    warmup: int = Field(3, description="untimed steps per variant first")
    burst: int | None = Field(None, description="consecutive steps per timed sample (default 8 on CUDA, 1 on CPU)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the ranks run; auto: CUDA if visible")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="the step's autocast precision")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads per rank (default: CPUs / ranks on CPU)"
    )
    variants: list[str] | None = Field(None, description="comma-separated subset (default all; sgd is always added)")
    seed: int = Field(0, ge=0, lt=INT64_LIMIT, description="seed of the initial weights and of the noise")
    memory: bool = Field(True, description="measure each variant's memory by allocation (--no-memory skips it)")
    json_path: str | None = Field(None, description="write the report as JSON")  # not `json`: BaseModel has one
    project: bool = Field(False, description="add a modelled projection of step time to 8..1024 GPUs")
    # The projection's cluster: a 200 Gb/s NIC per GPU; one DDP bucket per call at cluster scale; no
    # all-reduce hidden behind the backward, the worst case.
    bandwidth: float = Field(25.0, description="projection: all-reduce bus bandwidth per GPU in GB/s")
    latency_us: float = Field(50.0, description="projection: latency per all-reduce call in us")
    overlap: float = Field(0.0, description="projection: share of all-reduce time hidden behind compute")

    @model_validator(mode="after")
    def _check(self) -> BenchOptions:
        """Checks that need neither torch nor the variant list (the bench makes those when it resolves)."""
        if self.world_size < 1:
            raise ValueError(f"--world-size {self.world_size}: must be at least 1")
        if self.accumulation_steps < 1:
            raise ValueError(f"--accumulation-steps {self.accumulation_steps}: at least 1")
        if self.batch_size < 1:
            raise ValueError(
                f"--batch-size {self.batch_size}: must be at least 1 (the global batch, summed over ranks)"
            )
        k = self.accumulation_steps
        if self.batch_size % (2 * self.world_size * k):
            micro = f" x {k} micro-steps" if k > 1 else ""
            raise ValueError(
                f"--batch-size {self.batch_size}: S-SGD 'halves' splits every rank's batch in two, so it must be a "
                f"multiple of 2 x {self.world_size} ranks{micro} = {2 * self.world_size * k}"
            )
        models = MODEL_NAMES
        if self.model not in models:
            raise ValueError(f"--model {self.model}: expected one of {', '.join(models)}")
        if self.bandwidth <= 0 or self.latency_us < 0:
            raise ValueError(
                f"--bandwidth {self.bandwidth} / --latency-us {self.latency_us}: bandwidth > 0, latency >= 0"
            )
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"--steps {self.steps} / --warmup {self.warmup}: at least one timed step, warm-up >= 0")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"--burst {self.burst}: at least one step per timed sample")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"--overlap {self.overlap}: a fraction between 0 and 1")
        return self

    @classmethod
    def checked(cls, **values: Any) -> BenchOptions:
        """Validated options, a bad value raised as ``ConfigError`` (one line naming the flag: exit code 2)."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, list(cls.model_fields), _flag)) from None


class FlatnessOptions(BaseModel):
    """What ``ssgd-dist flatness`` measures and how precisely: the one set of defaults behind its flags,
    a sweep grid's ``flatness:`` mapping, and the ``options`` recorded in ``flatness.json``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    samples: int = Field(2000, description="training examples (first N; 0: all), sharded over ranks")
    batch_size: int = Field(1000, description="evaluation chunk per rank")
    radii: tuple[float, ...] = Field((0.01, 0.02, 0.05, 0.1, 0.2), description="relative perturbation radii")
    draws: int = Field(10, ge=1, description="symmetric +-n pairs per radius")
    distribution: Literal["sphere", "rademacher", "gaussian", "uniform"] = Field(
        "sphere", description="of the perturbation direction"
    )
    targets: Literal["weights", "all"] = Field("weights", description="perturbed tensors: weights (ndim >= 2) or all")
    power_iters: int = Field(100, ge=0, description="power-iteration steps for the top eigenvalue (0: skip)")
    power_tol: float = Field(1e-5, ge=0, description="relative change of the eigenvalue estimate that stops it")
    hutchinson: int = Field(100, ge=0, description="Rademacher probes for the Hessian trace (0: skip)")
    landscape_1d: int = Field(41, ge=0, description="points of the 1-D landscape in [-span, span] (0: skip)")
    landscape_2d: int = Field(21, ge=0, description="points per axis of the 2-D landscape (0: skip)")
    span: float = Field(1.0, description="landscape coordinates in [-span, span]")
    seed: int = Field(0, ge=0, lt=INT64_LIMIT, description="seed of the random directions")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> FlatnessOptions:
        """Validated options from a mapping (a grid's ``flatness:``, the flags given); errors name the key."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise ConfigError("flatness: " + validation_message(exc, list(cls.model_fields))) from None
