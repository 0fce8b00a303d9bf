"""`dvc repro` end to end on each real-data source, on tiny fixtures made here.

Each test copies the project (tests/dvc_project.py: code, stages, dvc.yaml, params.yaml, presets)
into a fresh git + DVC repository, applies the data set's preset, shrinks it (tiny images,
one epoch, small student) and runs the real `dvc repro`: download, prepare, both trainings,
distillation, evaluation and the report, each stage a real subprocess.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.data_fixtures import (build_tfds_cats_vs_dogs, http_server, make_cifar_archive, make_intel_zip,
                                 make_petimages_zip, make_shapes_folder, md5, shape_image)
from tests.dvc_project import make_dvc_project

pytestmark = pytest.mark.e2e

TINY = {
    "data.image_size": 8,
    "teacher.epochs": 1, "teacher.batch_size": 32,
    "student.epochs": 1, "student.batch_size": 32, "student.student_cnn.widths": [8, 16],
    "evaluate.latency_warmup": 0, "evaluate.latency_runs": 2, "evaluate.wait_alone_s": 0,
    "kd.methods": ["logit"],  # the data sources are under test here, not the KD methods
    "mlflow.log_models": False,
    "runtime.device": "cpu", "runtime.threads": 1,
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def repro(tmp_path: Path, dataset: str, settings: dict[str, Any], mlflow: bool = False) -> Path:
    """Run the whole pipeline on ``dataset``'s preset, shrunk; MLflow (sqlite in tmp_path)
    only where asked: it costs seconds per stage and does not depend on the data source."""
    project, env = make_dvc_project(
        tmp_path / "project", {**TINY, "mlflow.enabled": mlflow, **settings}, preset=dataset, commit=False,
        mlflow_db=tmp_path / "mlflow.db",
        env={"TFDS_DATA_DIR": str(tmp_path / "tfds-cache"), "PYTHONWARNINGS": "ignore"})
    _run(["dvc", "repro"], project, env, timeout=600)
    status = _run(["dvc", "status"], project, env)
    assert "up to date" in status.stdout
    evaluation = json.loads((project / "metrics/evaluation.json").read_text())
    assert set(evaluation) == {"teacher", "baseline", "distilled_logit"}
    assert all(0 <= m["test_accuracy"] <= 100 for m in evaluation.values())
    report = (project / "reports/report.md").read_text()
    assert "distilled_logit" in report
    return project


def test_cifar10_over_http(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    archive = make_cifar_archive(www / "cifar-10-python.tar.gz")
    with http_server(www) as base:
        project = repro(tmp_path, "cifar10", {"data.cifar10.url": f"{base}/cifar-10-python.tar.gz",
                                              "data.cifar10.md5": md5(archive)}, mlflow=True)
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["dataset"] == "cifar10" and data["test_images"] == 20 and data["image_shape"] == [3, 8, 8]
    assert not (project / "data/raw/cifar10/cifar-10-python.tar.gz").exists()
    assert (tmp_path / "mlflow.db").stat().st_size > 0


def test_intel_from_an_offline_zip(tmp_path):
    # The stages run as subprocesses, where the Kaggle service cannot be replaced: this goes
    # through data.intel.zip_path, the documented route for machines without Kaggle access.
    archive = make_intel_zip(tmp_path / "intel-image-classification.zip", per_class_train=5, per_class_test=2)
    project = repro(tmp_path, "intel", {"data.intel.zip_path": str(archive)})
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["dataset"] == "intel" and data["skipped_images"] == 1 and data["test_images"] == 12


def test_cats_vs_dogs_from_a_tfds_data_dir(tmp_path):
    # tfds.testing.mock_data patches the test process only, not the DVC stages' subprocesses.
    # So the test builds a real TFDS data_dir with TFDS's own cats_vs_dogs builder from a
    # generated source zip (only the network fetch is replaced), and the download stage copies
    # it from data.cats_vs_dogs.data_dir, exactly as it would a user's prepared copy.
    pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra (pip install -e '.[tfds]')")
    petimages = make_petimages_zip(tmp_path / "kagglecatsanddogs.zip", per_class=10)
    data_dir = build_tfds_cats_vs_dogs(tmp_path / "tfds", petimages)
    project = repro(tmp_path, "cats_vs_dogs", {"data.cats_vs_dogs.data_dir": str(data_dir)})
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["dataset"] == "cats_vs_dogs" and data["classes"] == 2
    assert sum(data[f"{s}_images"] for s in ("train", "val", "test")) == 20
    assert list((project / "data/raw/cats_vs_dogs/cats_vs_dogs").iterdir())[0].name == "4.0.1"


def test_own_image_folder_trains_and_a_new_image_re_runs_prepare(tmp_path):
    # The folder lies outside the project (a DVC dependency by absolute path), with a space in its
    # name. The run goes up to evaluate: the report stage does not depend on the data source.
    folder = make_shapes_folder(tmp_path / "my images", per_class=8)
    (folder / "circle" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "square" / "broken.jpg").write_bytes(b"not a jpeg")
    project, env = make_dvc_project(tmp_path / "project", {**TINY, "mlflow.enabled": False,
                                                           "data.imagefolder.path": str(folder)},
                                    preset="imagefolder", commit=False, env={"PYTHONWARNINGS": "ignore"})
    _run(["dvc", "repro", "evaluate"], project, env, timeout=600)
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["dataset"] == "imagefolder" and data["classes"] == 3 and data["image_shape"] == [3, 8, 8]
    assert data["skipped_images"] == 2 and data["skipped_examples"] == ["circle/.DS_Store (hidden)",
                                                                         "square/broken.jpg (not an image)"]
    assert sum(data[f"{s}_images"] for s in ("train", "val", "test")) == 24
    evaluation = json.loads((project / "metrics/evaluation.json").read_text())
    assert set(evaluation) == {"teacher", "baseline", "distilled_logit"}
    assert "up to date" in _run(["dvc", "status", "evaluate"], project, env).stdout

    shape_image("circle", 1234).save(folder / "circle" / "new.png")
    status = _run(["dvc", "status", "--with-deps", "prepare"], project, env).stdout
    assert "check_params" in status and "my images" in status  # the folder is a dependency
    _run(["dvc", "repro", "prepare"], project, env)
    data = json.loads((project / "metrics/data.json").read_text())
    assert sum(data[f"{s}_images"] for s in ("train", "val", "test")) == 25
    manifest = json.loads((project / "data/raw/imagefolder/manifest.json").read_text())
    assert "circle/new.png" in [f["path"] for f in manifest["files"]]
