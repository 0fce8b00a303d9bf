"""Typed, validated view of ``params.yaml``.

Every value is checked once, here, before a stage does any work: an unknown key, a wrong
type or an out-of-range value raises :class:`ConfigError` with one sentence naming the
dotted key, the value and what is allowed.

The plug-in sections are built from the registries (:mod:`kdpipe.plugins`): ``data.<source>``
for every data source, ``teacher.<arch>`` / ``student.<arch>`` for every architecture of that
role and ``kd.<method>`` for every KD method, each with the settings dataclass its module
registered. The code's defaults are the shipped ``params.yaml`` (a test compares them key by
key), so a key left out of params.yaml means the documented value, not another recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, Optional

import yaml

from kdpipe.data.sources import SOURCES
from kdpipe.distill.base import METHODS, SharedKd
from kdpipe.errors import ConfigError
from kdpipe.models.registry import MODELS
from kdpipe.validation import Settings, as_dict, build, derived_fields, fail, flatten

__all__ = ["AugmentConfig", "DataConfig", "EvaluateConfig", "KdConfig", "MlflowConfig", "Params", "RuntimeConfig",
           "StudentConfig", "TeacherConfig", "TrainConfig", "flatten", "load_params", "parse_params", "params_dict"]


@dataclass(frozen=True)
class AugmentConfig(Settings):
    crop_padding: int = 1
    flip: bool = True
    mix: Literal["none", "mixup", "cutmix"] = "none"  # teacher and student see the same mixed image
    mix_alpha: float = 1.0  # the mixing weight λ ~ Beta(mix_alpha, mix_alpha)

    def check(self, key: str) -> None:
        if self.crop_padding < 0:
            fail(f"{key}.crop_padding", self.crop_padding, "an integer >= 0")
        if self.mix_alpha <= 0:
            fail(f"{key}.mix_alpha", self.mix_alpha, "a number > 0")


class _DataChecks(Settings):
    def check(self, key: str) -> None:
        SOURCES.get(self.name, f"{key}.name")  # an unknown name lists the registered sources
        if self.image_size is not None and not 4 <= self.image_size <= 512:
            fail(f"{key}.image_size", self.image_size, "null (the data set's default) or an integer between 4 and 512")
        if self.channels not in (None, 1, 3):
            fail(f"{key}.channels", self.channels, "null (the data set's own), 1 (greyscale) or 3 (RGB)")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                fail(f"{key}.{name}", value, "a fraction strictly between 0 and 1")
        if self.val_fraction + self.test_fraction >= 0.95:
            fail(f"{key}.val_fraction+{key}.test_fraction", round(self.val_fraction + self.test_fraction, 4),
                 "a sum below 0.95 so that training data remains")

    @property
    def source(self) -> Any:
        """The selected source's own settings (``data.<name>``)."""
        return getattr(self, self.name)


def _sections(plugins) -> list[tuple[str, type, Any]]:
    """One dataclass field per plug-in: its settings, defaulting to the settings' defaults."""
    return [(p.name, p.settings, field(default_factory=p.settings)) for p in plugins]


DataConfig = dataclasses.make_dataclass("DataConfig", [
    ("name", str, field(default="digits")),
    ("image_size", Optional[int], field(default=None)),  # None: the source's default size
    ("channels", Optional[int], field(default=None)),  # None: the source's own (1 for digits, 3 for photos)
    ("val_fraction", float, field(default=0.15)),
    ("test_fraction", float, field(default=0.15)),
    ("augment", AugmentConfig, field(default_factory=AugmentConfig)),
    *_sections(SOURCES),
], bases=(_DataChecks,), frozen=True)


@dataclass(frozen=True)
class TrainConfig(Settings):
    """The optimisation recipe shared by the teacher, the baseline and distillation."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    warmup_fraction: float = 0.2
    step_size: int = 5
    gamma: float = 0.5

    def check(self, key: str) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            if getattr(self, name) <= 0:
                fail(f"{key}.{name}", getattr(self, name), "an integer > 0")
        if self.lr <= 0:
            fail(f"{key}.lr", self.lr, "a number > 0")
        if not 0 <= self.momentum < 1:
            fail(f"{key}.momentum", self.momentum, "a number in [0, 1)")
        if self.weight_decay < 0:
            fail(f"{key}.weight_decay", self.weight_decay, "a number >= 0")
        if not 0 <= self.label_smoothing < 1:
            fail(f"{key}.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        if not 0 <= self.warmup_fraction < 1:
            fail(f"{key}.warmup_fraction", self.warmup_fraction, "a number in [0, 1)")
        if not 0 < self.gamma <= 1:
            fail(f"{key}.gamma", self.gamma, "a number in (0, 1]")


class _ModelChecks(TrainConfig):
    role = ""

    def check(self, key: str) -> None:
        super().check(key)
        MODELS.get(self.arch, f"{key}.arch", roles=self.role)
        if self.seed is not None and self.seed < 0:
            fail(f"{key}.seed", self.seed, "null (the global seed) or an integer >= 0")

    @property
    def arch_settings(self) -> Any:
        """The selected architecture's own settings (``<role>.<arch>``)."""
        return getattr(self, self.arch)


def _model_config(role: str, arch: str, epochs: int, own: Sequence[tuple[str, Any, Any]] = ()) -> type:
    return dataclasses.make_dataclass(f"{role.title()}Config", [
        ("epochs", int, field(default=epochs)),
        ("arch", str, field(default=arch)),
        *own,
        *_sections(MODELS.get(n) for n in MODELS.names(roles=role)),
    ], bases=(_ModelChecks,), namespace={"role": role}, frozen=True)


# teacher.mix: the teacher's own mixing (null: data.augment.mix). The students' views, and so the
# teacher_targets cache, always follow data.augment: a teacher can learn with CutMix while the
# students it teaches see plain views, or the other way round.
# teacher.seed seeds the teacher's run (initialisation, batch order, views); null: the global
# seed. Several teachers on the same split (the split keeps the global seed): for multi_teacher.
TeacherConfig = _model_config("teacher", "resnet18", epochs=15,
                              own=[("mix", Optional[Literal["none", "mixup", "cutmix"]], field(default=None)),
                                   ("seed", Optional[int], field(default=None))])
# student.seed seeds every student run (initialisation, batch order, augmented views, hence the
# teacher_targets cache); null: the global seed, which alone seeds the split.
StudentConfig = _model_config("student", "student_cnn", epochs=30,
                              own=[("seed", Optional[int], field(default=None))])


class _KdChecks(SharedKd):
    def check(self, key: str) -> None:
        super().check(key)
        if not self.methods:
            fail(f"{key}.methods", self.methods, "a non-empty list of " + ", ".join(METHODS.names()))
        for method in self.methods:
            METHODS.get(method)
            getattr(self, method).check_selected(f"{key}.{method}")
        if len(set(self.methods)) != len(self.methods):
            fail(f"{key}.methods", self.methods, "a list without repeats")

    def method(self, name: str) -> Any:
        """The resolved settings of method ``name``: its section plus the shared values it reads."""
        return getattr(self, name)


def _method_defaults(plugin) -> Any:
    """A method's default settings: its section's defaults with the shared defaults it reads."""
    shared = SharedKd()
    return plugin.settings(**{name: getattr(shared, name) for name in derived_fields(plugin.settings)})


KdConfig = dataclasses.make_dataclass("KdConfig", [
    ("methods", list[str], field(default_factory=lambda: ["logit", "attention", "dkd"])),
    *[(p.name, p.settings, field(default_factory=lambda p=p: _method_defaults(p))) for p in METHODS],
], bases=(_KdChecks,), frozen=True)


@dataclass(frozen=True)
class EvaluateConfig(Settings):
    batch_size: int = 256
    latency_warmup: int = 20
    latency_runs: int = 200
    timing_threads: int = 1
    wait_alone_s: float = 600.0
    bootstrap_resamples: int = 2000

    def check(self, key: str) -> None:
        for name in ("batch_size", "latency_runs"):
            if getattr(self, name) <= 0:
                fail(f"{key}.{name}", getattr(self, name), "an integer > 0")
        for name in ("latency_warmup", "timing_threads", "wait_alone_s"):
            if getattr(self, name) < 0:
                fail(f"{key}.{name}", getattr(self, name), "a number >= 0")
        if self.bootstrap_resamples < 1000:
            fail(f"{key}.bootstrap_resamples", self.bootstrap_resamples,
                 "an integer >= 1000 (fewer make the ends of a 95% interval noisy)")


@dataclass(frozen=True)
class MlflowConfig(Settings):
    enabled: bool = True
    experiment: str = "kdpipe"
    log_models: bool = True
    artifact_location: str = "mlruns"
    required: bool = False  # False: an unreachable or failing tracking store costs a warning, never a training

    def check(self, key: str) -> None:
        if not self.experiment.strip():
            fail(f"{key}.experiment", self.experiment, "a non-empty name")
        if not self.artifact_location.strip():
            fail(f"{key}.artifact_location", self.artifact_location,
                 "a folder relative to the project root, an absolute path or a URI")


@dataclass(frozen=True)
class RuntimeConfig(Settings):
    """How to use the hardware; results are reproducible for a fixed runtime section."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    bf16: Literal["auto", "on", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    nproc: int = 1  # training processes (DistributedDataParallel under torchrun) for the training stages

    def check(self, key: str) -> None:
        if self.threads < 0:
            fail(f"{key}.threads", self.threads, "0 (all cores) or a positive integer")
        if self.nproc < 1:
            fail(f"{key}.nproc", self.nproc, "a positive integer (1: one process; N: N processes under torchrun)")


@dataclass(frozen=True)
class Params(Settings):
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
            fail("seed", self.seed, "an integer >= 0")
        if self.kd.teacher_flip and not self.data.augment.flip:  # early; digits-like data: teacher_targets
            fail("kd.teacher_flip", True, "false while data.augment.flip is false (the teacher is averaged with "
                 "mirror images, which the views say may change the class)")

    def seed_for(self, role: str) -> int:
        """The seed of the ``teacher`` run or of the ``student`` runs (baseline, teacher_targets,
        distill): ``<role>.seed``, or the global ``seed`` (which alone seeds the split) when null."""
        own = getattr(self, role).seed
        return self.seed if own is None else own

    @property
    def student_seed(self) -> int:
        return self.seed_for("student")

    def augment_for(self, role: str) -> AugmentConfig:
        """The augmentation a ``teacher`` or ``student`` run trains with: ``data.augment``, with
        ``teacher.mix`` in place of its mix for the teacher when that is set."""
        mix = getattr(getattr(self, role), "mix", None)
        return self.data.augment if mix is None else dataclasses.replace(self.data.augment, mix=mix)


def _parse_kd(data: Any, prefix: str = "kd") -> Any:
    """``kd``: the shared values first, then each method's section with the shared values it
    declares (its ``derived`` fields) filled in from them."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(prefix, data, "a mapping of keys to values")
    method_names = set(METHODS.names())
    top = {k: v for k, v in data.items() if k not in method_names}
    allowed = {"methods", *(f.name for f in dataclasses.fields(SharedKd)), *method_names}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"params.yaml: unknown key '{prefix}.{key}'; allowed keys here are "
                              + ", ".join(sorted(allowed)) + ".")
    shared = build(SharedKd, {k: v for k, v in top.items() if k != "methods"}, prefix)
    sections = {}
    for plugin in METHODS:
        given = {}
        for name in derived_fields(plugin.settings):
            if not hasattr(shared, name):  # a bug in the method's module
                raise TypeError(f"kd method {plugin.name} reads kd.{name}, which is not a shared KD setting")
            given[name] = getattr(shared, name)
        sections[plugin.name] = build(plugin.settings, data.get(plugin.name), f"{prefix}.{plugin.name}", given)
    methods = build(KdConfig, {"methods": top["methods"]} if "methods" in top else {}, prefix,
                    given={**as_dict(shared), **sections})
    return methods


def parse_params(data: Any) -> Params:
    """Validate a params mapping (as read from YAML) into :class:`Params`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail("params.yaml", data, "a mapping of keys to values")
    return build(Params, {k: v for k, v in data.items() if k != "kd"}, "", given={"kd": _parse_kd(data.get("kd"))})


def params_dict(params: Params) -> dict[str, Any]:
    """``params`` as the mapping params.yaml would hold (derived values left out)."""
    return as_dict(params)


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
