"""Where every stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

from pathlib import Path

RAW_DIR = Path("data/raw")
DATA_SOURCE_FILE = Path("data/data_source.json")  # check_params: the validated data set name
PREPARED_DIR = Path("data/prepared")
TEACHER_TARGETS_DIR = Path("data/teacher_targets")
KD_SETTINGS_DIR = Path("data/kd_settings")
# export: the ONNX models. Not under models/, which evaluate and export depend on as a whole
# (DVC refuses a stage whose output lies inside its own dependency).
ONNX_DIR = Path("data/onnx")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
TIMING_DIR = METRICS_DIR / "timing"  # machine- and load-dependent figures, apart from quality
PLOTS_DIR = Path("plots")
HISTORY_DIR = PLOTS_DIR / "history"
CONFUSION_DIR = PLOTS_DIR / "confusion"
REPORTS_DIR = Path("reports")
FIGURES_DIR = REPORTS_DIR / "figures"

TEACHER = "teacher"
BASELINE = "baseline"
_DISTILLED_PREFIX = "distilled_"


def distilled_name(method: str) -> str:
    return f"{_DISTILLED_PREFIX}{method}"


def is_distilled(name: str) -> bool:
    """Whether ``name`` is a distilled student's (as made by :func:`distilled_name`)."""
    return name.startswith(_DISTILLED_PREFIX)


def distilled_method(name: str) -> str:
    """The method of a distilled student's name (the inverse of :func:`distilled_name`)."""
    return name.removeprefix(_DISTILLED_PREFIX)


def model_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.pt"


def onnx_path(name: str, int8: bool = False) -> Path:
    """A model's ONNX file (``int8``: its statically quantized version)."""
    return ONNX_DIR / f"{name}{'.int8' if int8 else ''}.onnx"


def history_path(name: str) -> Path:
    return HISTORY_DIR / f"{name}.csv"


def train_metrics_path(name: str) -> Path:
    return METRICS_DIR / f"{name}.json"


def timing_path(name: str) -> Path:
    """Where a stage's timings go (``name``: a model's name, ``teacher_targets`` or ``evaluate``)."""
    return TIMING_DIR / f"{name}.json"


def model_names(methods: list[str]) -> list[str]:
    """Every model the pipeline trains, in report order."""
    return [TEACHER, BASELINE, *(distilled_name(m) for m in methods)]
