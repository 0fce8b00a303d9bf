"""Typed, validated view of ``params.yaml``.

Every value is checked once, here, before a stage does any work: an unknown key, a wrong
type or an out-of-range value raises :class:`ConfigError` with one sentence naming the
dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from kdpipe.errors import ConfigError

DATASETS = ("digits", "cifar10", "intel", "cats_vs_dogs")
TEACHER_ARCHS = ("resnet18", "vea_resnet18", "mobilenet_v2")
RESNET_TEACHERS = ("resnet18", "vea_resnet18")  # the ones with teacher.width
STUDENT_ARCHS = ("student_cnn",)
KD_METHODS = ("logit", "attention", "combined", "fitnets", "dkd", "multi_teacher")


# Files a stage reads that params name must sit in folders dvc.yaml declares as dependencies.
PRETRAINED_DIR = "teachers/pretrained"  # teacher.weights_path (train_teacher)
ENSEMBLE_DIR = "teachers/ensemble"  # kd.teachers (distill)


def _under(path: str, folder: str) -> bool:
    """True when relative ``path`` names something inside ``folder`` (no ``..`` escapes)."""
    norm = posixpath.normpath(path.replace("\\", "/"))
    return not posixpath.isabs(norm) and norm.startswith(folder + "/")


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"params.yaml: {key}={value!r} is not allowed; expected {allowed}.")


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 0
    flip: bool = False

    def check(self, key: str) -> None:
        if self.crop_padding < 0:
            _fail(f"{key}.crop_padding", self.crop_padding, "an integer >= 0")


@dataclass(frozen=True)
class DigitsConfig:
    """scikit-learn's digits need no settings; the section exists so every source has one."""

    def check(self, key: str) -> None:
        pass


@dataclass(frozen=True)
class Cifar10Config:
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5: str = "c58f30108f718f92721af3b95e74349a"

    def check(self, key: str) -> None:
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if not self.url.strip() or scheme not in ("", "http", "https", "file"):
            _fail(f"{key}.url", self.url, "an http(s):// or file:// URL or a local path")
        if len(self.md5) != 32 or any(c not in "0123456789abcdef" for c in self.md5.lower()):
            _fail(f"{key}.md5", self.md5, "a 32-character hexadecimal md5")


@dataclass(frozen=True)
class IntelConfig:
    kaggle_dataset: str = "puneet6060/intel-image-classification"
    zip_path: Optional[str] = None
    max_per_class: Optional[int] = None

    def check(self, key: str) -> None:
        if "/" not in self.kaggle_dataset:
            _fail(f"{key}.kaggle_dataset", self.kaggle_dataset, "'owner/dataset'")
        if self.max_per_class is not None and self.max_per_class <= 0:
            _fail(f"{key}.max_per_class", self.max_per_class, "null or an integer > 0")


@dataclass(frozen=True)
class CatsVsDogsConfig:
    data_dir: Optional[str] = None
    max_per_class: Optional[int] = None

    def check(self, key: str) -> None:
        if self.max_per_class is not None and self.max_per_class <= 0:
            _fail(f"{key}.max_per_class", self.max_per_class, "null or an integer > 0")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    image_size: Optional[int] = None  # None: the source's default (its DEFAULT_IMAGE_SIZE)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    cifar10: Cifar10Config = field(default_factory=Cifar10Config)
    intel: IntelConfig = field(default_factory=IntelConfig)
    cats_vs_dogs: CatsVsDogsConfig = field(default_factory=CatsVsDogsConfig)

    def check(self, key: str) -> None:
        if self.name not in DATASETS:
            _fail(f"{key}.name", self.name, "one of " + ", ".join(DATASETS))
        if self.image_size is not None and not 4 <= self.image_size <= 512:
            _fail(f"{key}.image_size", self.image_size, "null (the data set's default) or an integer between 4 and 512")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                _fail(f"{key}.{name}", value, "a fraction strictly between 0 and 1")
        if self.val_fraction + self.test_fraction >= 0.95:
            _fail(
                f"{key}.val_fraction+{key}.test_fraction",
                round(self.val_fraction + self.test_fraction, 4),
                "a sum below 0.95 so that training data remains",
            )


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe shared by the teacher, the baseline and distillation."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    warmup_fraction: float = 0.15
    step_size: int = 5
    gamma: float = 0.5

    def check(self, key: str) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            if getattr(self, name) <= 0:
                _fail(f"{key}.{name}", getattr(self, name), "an integer > 0")
        if self.lr <= 0:
            _fail(f"{key}.lr", self.lr, "a number > 0")
        if not 0 <= self.momentum < 1:
            _fail(f"{key}.momentum", self.momentum, "a number in [0, 1)")
        if self.weight_decay < 0:
            _fail(f"{key}.weight_decay", self.weight_decay, "a number >= 0")
        if not 0 <= self.label_smoothing < 1:
            _fail(f"{key}.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        if not 0 <= self.warmup_fraction < 1:
            _fail(f"{key}.warmup_fraction", self.warmup_fraction, "a number in [0, 1)")
        if not 0 < self.gamma <= 1:
            _fail(f"{key}.gamma", self.gamma, "a number in (0, 1]")


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    arch: str = "resnet18"
    width: int = 64  # resnet18, vea_resnet18: channels of the first stage (64: the standard ResNet-18)
    pretrained: Optional[Literal["imagenet"]] = None
    freeze_backbone: bool = False
    weights_path: Optional[str] = None
    input_size: Optional[int] = None  # mobilenet_v2: resize inside the model (null: 224)

    def check(self, key: str) -> None:
        super().check(key)
        if self.arch not in TEACHER_ARCHS:
            _fail(f"{key}.arch", self.arch, "one of " + ", ".join(TEACHER_ARCHS))
        if self.arch in RESNET_TEACHERS and not 8 <= self.width <= 256:
            _fail(f"{key}.width", self.width, "an integer between 8 and 256 (64: the standard ResNet-18)")
        if self.arch not in RESNET_TEACHERS and self.width != 64:
            _fail(f"{key}.width", self.width, f"64 with {key}.arch={self.arch} (only the ResNet-18 teachers use it)")
        if self.arch != "mobilenet_v2":
            for name in ("pretrained", "weights_path", "input_size"):
                if getattr(self, name) is not None:
                    _fail(f"{key}.{name}", getattr(self, name),
                          f"null with {key}.arch={self.arch} (only mobilenet_v2 uses it)")
        if self.input_size is not None and not 32 <= self.input_size <= 512:
            _fail(f"{key}.input_size", self.input_size, "null (224) or an integer between 32 and 512")
        if self.weights_path is not None and not _under(self.weights_path, PRETRAINED_DIR):
            _fail(f"{key}.weights_path", self.weights_path,
                  f"a file under {PRETRAINED_DIR}/, the folder train_teacher declares as a DVC dependency")
        if self.freeze_backbone and self.pretrained is None and self.weights_path is None:
            _fail(f"{key}.freeze_backbone", self.freeze_backbone,
                  f"false unless {key}.pretrained or {key}.weights_path gives pretrained weights to freeze")


@dataclass(frozen=True)
class StudentConfig(TrainConfig):
    arch: str = "student_cnn"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    convs_per_block: int = 1
    dropout: float = 0.2

    def check(self, key: str) -> None:
        super().check(key)
        if self.arch not in STUDENT_ARCHS:
            _fail(f"{key}.arch", self.arch, "one of " + ", ".join(STUDENT_ARCHS))
        if not self.widths or any(w <= 0 for w in self.widths):
            _fail(f"{key}.widths", self.widths, "a non-empty list of integers > 0")
        if not 1 <= self.convs_per_block <= 8:
            _fail(f"{key}.convs_per_block", self.convs_per_block, "an integer between 1 and 8")
        if not 0 <= self.dropout < 1:
            _fail(f"{key}.dropout", self.dropout, "a number in [0, 1)")


@dataclass(frozen=True)
class AttentionConfig:
    beta: float = 1000.0
    p: int = 2

    def check(self, key: str) -> None:
        if self.beta < 0:
            _fail(f"{key}.beta", self.beta, "a number >= 0")
        if self.p <= 0:
            _fail(f"{key}.p", self.p, "an integer > 0")


@dataclass(frozen=True)
class FitnetsConfig:
    beta: float = 100.0

    def check(self, key: str) -> None:
        if self.beta < 0:
            _fail(f"{key}.beta", self.beta, "a number >= 0")


@dataclass(frozen=True)
class DkdConfig:
    alpha: float = 1.0
    beta: float = 8.0
    warmup_epochs: int = 5

    def check(self, key: str) -> None:
        for name in ("alpha", "beta", "warmup_epochs"):
            if getattr(self, name) < 0:
                _fail(f"{key}.{name}", getattr(self, name), "a number >= 0")


@dataclass(frozen=True)
class KdConfig:
    methods: list[str] = field(default_factory=lambda: ["logit"])
    temperature: float = 4.0
    alpha: float = 0.9
    teacher_targets: Literal["cached", "online"] = "cached"
    teachers: list[str] = field(default_factory=list)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    fitnets: FitnetsConfig = field(default_factory=FitnetsConfig)
    dkd: DkdConfig = field(default_factory=DkdConfig)

    def check(self, key: str) -> None:
        if not self.methods:
            _fail(f"{key}.methods", self.methods, "a non-empty list of " + ", ".join(KD_METHODS))
        for method in self.methods:
            if method not in KD_METHODS:
                _fail(f"{key}.methods", method, "one of " + ", ".join(KD_METHODS))
        if len(set(self.methods)) != len(self.methods):
            _fail(f"{key}.methods", self.methods, "a list without repeats")
        if self.temperature <= 0:
            _fail(f"{key}.temperature", self.temperature, "a number > 0")
        if not 0 <= self.alpha <= 1:
            _fail(f"{key}.alpha", self.alpha, "a number in [0, 1]")
        for path in self.teachers:
            if not _under(path, ENSEMBLE_DIR) or not path.endswith(".pt"):
                _fail(f"{key}.teachers", path, f"a kdpipe model file (.pt) under {ENSEMBLE_DIR}/, "
                      "the folder the distill stages declare as a DVC dependency")
        if len(set(self.teachers)) != len(self.teachers):
            _fail(f"{key}.teachers", self.teachers, "a list without repeats")
        if "multi_teacher" in self.methods and not self.teachers:
            _fail(f"{key}.teachers", self.teachers,
                  f"at least one extra teacher under {ENSEMBLE_DIR}/ when {key}.methods has multi_teacher "
                  "(the pipeline's own teacher is always part of the ensemble)")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 256
    latency_warmup: int = 10
    latency_runs: int = 50

    def check(self, key: str) -> None:
        for name in ("batch_size", "latency_runs"):
            if getattr(self, name) <= 0:
                _fail(f"{key}.{name}", getattr(self, name), "an integer > 0")
        if self.latency_warmup < 0:
            _fail(f"{key}.latency_warmup", self.latency_warmup, "an integer >= 0")


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = True
    experiment: str = "kdpipe"
    log_models: bool = True

    def check(self, key: str) -> None:
        if not self.experiment.strip():
            _fail(f"{key}.experiment", self.experiment, "a non-empty name")


@dataclass(frozen=True)
class RuntimeConfig:
    """How to use the hardware; results are reproducible for a fixed runtime section."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    bf16: Literal["auto", "on", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False

    def check(self, key: str) -> None:
        if self.threads < 0:
            _fail(f"{key}.threads", self.threads, "0 (all cores) or a positive integer")


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KdConfig = field(default_factory=KdConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def check(self, key: str) -> None:
        if self.seed < 0:
            _fail("seed", self.seed, "an integer >= 0")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return "null or " + " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` checked against type hint ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner, value, key) if value is not None else _fail(key, value, _type_name(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if isinstance(value, bool) or value not in allowed:
            _fail(key, value, _type_name(tp))
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(key, value, _type_name(tp))
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            _fail(key, value, "a finite number")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix or "params.yaml", data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"params.yaml: unknown key {where!r}; allowed keys here are "
                + ", ".join(sorted(fields))
                + "."
            )
    values = {
        name: _coerce(hints[name], data[name], f"{prefix}.{name}" if prefix else name)
        for name in fields
        if name in data
    }
    obj = cls(**values)
    obj.check(prefix)
    return obj


def parse_params(data: Any) -> Params:
    """Validate a params mapping (as read from YAML) into :class:`Params`."""
    return _build(Params, data, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ConfigError with a readable message."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run the stage from the project root.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        # One sentence: PyYAML's own message spans several lines with a caret drawing.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the file and run the stage again.") from None
    return parse_params(data)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a params object or mapping into dotted keys (for MLflow)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
