"""End to end: the real `dvc repro`, `dvc exp run`, `dvc metrics diff`, `dvc plots diff` and the MLflow
store, on a copy of the project in a temporary git repository, with tiny epochs.

Everything expensive runs once, in the module fixture; each test then checks one promise.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import make_dvc_project

pytestmark = pytest.mark.e2e

ALL_STAGES = ["check_params", "download", "prepare", "train_teacher", "train_student", "teacher_targets", "kd_settings",
              "distill@logit", "evaluate", "export", "report"]
DOWNSTREAM_OF_KD = ["check_params", "kd_settings", "distill@logit", "evaluate", "export", "report"]
FORCED = ["prepare", "train_student", "teacher_targets", "evaluate", "export"]  # re-run by force on the same inputs
NO_MLFLOW_RUN = {"check_params", "kd_settings"}  # bookkeeping: they resolve params, train and measure nothing
MODEL_KEYS = {"test_accuracy", "test_accuracy_ci95", "params", "size_mb"}
STUDENT_KEYS = MODEL_KEYS | {"compression_ratio", "accuracy_vs_teacher"}
TIMING_KEYS = {"latency_ms_p50", "latency_ms_p10", "latency_ms_p90", "throughput_ips", "efficiency"}
# what a stage writes is a function of its inputs: these outputs must come out byte-identical when
# a stage re-runs on the same inputs (only files under metrics/timing/ and plots/timing/ may differ)
STABLE_OUTPUTS = ["data/prepared", "models", "data/teacher_targets", "plots/history", "metrics/baseline.json",
                  "metrics/teacher.json", "metrics/distilled_logit.json", "metrics/data.json",
                  "metrics/evaluation.json", "plots/curves.csv", "plots/predictions.csv", "plots/confusion",
                  "plots/per_class_accuracy.csv", "plots/accuracy_vs_size.csv", "data/onnx", "metrics/export.json"]
PAIRED_KEYS = {"accuracy_diff_vs_baseline", "accuracy_diff_ci95", "mcnemar_p", "gap_closed"}
FIGURES = ["accuracy.png", "per_class_accuracy.png", "training_curves.png", "training_objectives.png",
           "confusion_matrices.png", "predictions.png", "accuracy_vs_latency.png", "accuracy_vs_size.png",
           "deployment.png"]
EXP_NAME = "kd-t3"
TEACHER_EPOCHS, STUDENT_EPOCHS = 1, 2


@dataclass
class Project:
    root: Path
    env: dict
    log: list = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        done = subprocess.run(list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=900)
        self.log.append((cmd, done.returncode, round(time.perf_counter() - start, 1)))
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def git(self, *args: str) -> str:
        return self.run("git", *args).stdout.strip()


def output_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under :data:`STABLE_OUTPUTS`."""
    out = {}
    for entry in STABLE_OUTPUTS:
        base = root / entry
        for path in sorted([base] if base.is_file() else base.rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


TINY_PARAMS = {
    "teacher.epochs": TEACHER_EPOCHS,
    "teacher.batch_size": 64, "teacher.lr": 0.02,  # learns something (~85% val) in its one epoch
    "student.epochs": STUDENT_EPOCHS,
    "kd.methods": ["logit"],  # pipeline mechanics with one method (test_e2e_kd_methods.py: several)
    "evaluate.batch_size": 64, "evaluate.latency_warmup": 1, "evaluate.latency_runs": 3, "evaluate.wait_alone_s": 0,
    "mlflow.log_models": False,  # model logging has its own test (test_tracking.py)
    "runtime.threads": 1,  # a shared 2-core CI box: two threads per process oversubscribe it
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    root, env = make_dvc_project(tmp_path_factory.mktemp("kdpipe_e2e"), TINY_PARAMS)
    p = Project(root, env)
    r = p.results
    r["rev_before_repro"] = p.git("rev-parse", "HEAD")

    first = p.run("dvc", "repro")
    r["repro_stages"] = stages_run(first.stdout)
    r["evaluation"] = json.loads((root / "metrics" / "evaluation.json").read_text())
    r["status"] = p.run("dvc", "status", "--json").stdout
    r["second_repro"] = p.run("dvc", "repro").stdout
    r["hashes_first"] = output_hashes(root)
    # the same inputs again: prepare, a training, the teacher targets and evaluate re-run by force
    r["forced_prepare"] = stages_run(p.run("dvc", "repro", "-f", "-s", "prepare").stdout)
    r["status_after_forced_prepare"] = p.run("dvc", "status", "--json").stdout
    for stage in FORCED[1:]:
        p.run("dvc", "repro", "-f", "-s", stage)
    r["hashes_forced"] = output_hashes(root)
    r["status_after_forced"] = p.run("dvc", "status", "--json").stdout

    p.git("add", "-A")
    p.git("commit", "-q", "-m", "tiny run")
    r["rev_baseline"] = p.git("rev-parse", "HEAD")

    exp = p.run("dvc", "exp", "run", "-n", EXP_NAME, "-S", "kd.temperature=3")
    r["exp_stages"] = stages_run(exp.stdout)
    r["exp_evaluation"] = json.loads((root / "metrics" / "evaluation.json").read_text())
    r["metrics_diff"] = json.loads(p.run("dvc", "metrics", "diff", "HEAD", "--all", "--json").stdout)
    r["plots_diff"] = json.loads(p.run("dvc", "plots", "diff", "HEAD", "--json").stdout)
    r["exp_show"] = json.loads(p.run("dvc", "exp", "show", "--json").stdout)
    return p


def test_repro_runs_every_stage_once(project):
    assert project.results["repro_stages"] == ALL_STAGES


def test_outputs_exist(project):
    root = project.root
    for name in ("teacher", "baseline", "distilled_logit"):
        assert (root / "models" / f"{name}.pt").stat().st_size > 0
        history = (root / "plots" / "history" / f"{name}.csv").read_text().splitlines()
        epochs = TEACHER_EPOCHS if name == "teacher" else STUDENT_EPOCHS
        assert history[0].startswith("model,epoch,train_loss,train_acc,val_loss,val_acc,lr")
        assert len(history) == 1 + epochs
        train = json.loads((root / "metrics" / f"{name}.json").read_text())
        assert train["epochs"] == epochs
    for name in ("curves.csv", "predictions.csv", "per_class_accuracy.csv", "accuracy_vs_size.csv",
                 "timing/accuracy_vs_latency.csv"):
        assert (root / "plots" / name).stat().st_size > 0
    for name in ("teacher", "baseline", "distilled_logit"):  # the export stage: ONNX, int8 for the students
        assert (root / "data" / "onnx" / f"{name}.onnx").stat().st_size > 0
        assert (root / "data" / "onnx" / f"{name}.int8.onnx").exists() == (name != "teacher")
    export = json.loads((root / "metrics" / "export.json").read_text())
    assert set(export["teacher"]) == {"pytorch", "ort_fp32"}
    assert set(export["baseline"]) == set(export["distilled_logit"]) == {"pytorch", "ort_fp32", "ort_int8"}
    for name in ("teacher", "baseline", "distilled_logit", "teacher_targets", "evaluate", "export"):
        timing = json.loads((root / "metrics" / "timing" / f"{name}.json").read_text())
        assert timing["machine"]["cpu"] and timing["machine"]["threads"] >= 1, name
    assert json.loads((root / "metrics" / "timing" / "baseline.json").read_text())["train_seconds"] > 0
    for name in ("teacher", "baseline", "distilled_logit"):
        rows = (root / "plots" / "confusion" / f"{name}.csv").read_text().splitlines()
        assert rows[0] == "actual,predicted"
    data = json.loads((root / "metrics" / "data.json").read_text())
    assert data["dataset"] == "digits" and data["classes"] == 10
    assert data["train_images"] + data["val_images"] + data["test_images"] == 1797


def test_evaluation_json_has_every_model_with_the_documented_keys(project):
    evaluation = project.results["evaluation"]
    assert list(evaluation) == ["teacher", "baseline", "distilled_logit"]
    assert MODEL_KEYS <= set(evaluation["teacher"])
    for name in ("baseline", "distilled_logit"):
        m = evaluation[name]
        assert STUDENT_KEYS <= set(m)
        teacher = evaluation["teacher"]
        assert m["compression_ratio"] == pytest.approx(teacher["size_mb"] / m["size_mb"], rel=1e-3)
        assert m["accuracy_vs_teacher"] == pytest.approx(m["test_accuracy"] - teacher["test_accuracy"], abs=1e-3)
        assert m["params"] == evaluation["baseline"]["params"]  # the same student, twice
    assert evaluation["teacher"]["params"] > 20 * evaluation["baseline"]["params"]  # width-32 ResNet-18: 2.8M
    # even one or two epochs learn something: the pipeline trains, it does not just write files
    assert evaluation["teacher"]["test_accuracy"] > 50 and evaluation["baseline"]["test_accuracy"] > 50
    timing = json.loads((project.root / "metrics" / "timing" / "evaluate.json").read_text())
    for name, m in evaluation.items():
        assert 0 <= m["test_accuracy"] <= 100 and not TIMING_KEYS & set(m)
        t = timing["models"][name]
        assert TIMING_KEYS <= set(t) and 0 < t["latency_ms_p10"] <= t["latency_ms_p50"] <= t["latency_ms_p90"]
        low, high = m["test_accuracy_ci95"]  # Wilson, percent (a list: `dvc metrics` leaves it out)
        assert 0 <= low <= m["test_accuracy"] <= high <= 100
    # the distilled student against the baseline, on the same test images
    student, baseline = evaluation["distilled_logit"], evaluation["baseline"]
    assert PAIRED_KEYS <= set(student) and not PAIRED_KEYS & set(baseline)
    diff = student["accuracy_diff_vs_baseline"]
    assert diff == pytest.approx(student["test_accuracy"] - baseline["test_accuracy"], abs=1e-3)
    low, high = student["accuracy_diff_ci95"]
    assert low <= diff <= high
    assert 0 < student["mcnemar_p"] <= 1
    teacher_gap = evaluation["teacher"]["test_accuracy"] - baseline["test_accuracy"]
    if teacher_gap > 0:
        assert student["gap_closed"] == pytest.approx(diff / teacher_gap, abs=1e-3)
    else:
        assert student["gap_closed"] is None


def test_report_and_figures(project):
    root = project.root
    report = (root / "reports" / "report.md").read_text()
    for name in ("teacher", "baseline", "distilled_logit"):
        assert f"| {name} |" in report
    # the report was redrawn by the experiment: it shows the experiment's numbers and T
    for name, metrics in project.results["exp_evaluation"].items():
        assert f"| {name} | {metrics['test_accuracy']:.2f} |" in report
    assert "T=3.0" in report
    assert "| 95% CI (%) | vs baseline (pt) [95% CI] | McNemar p | Gap closed |" in report
    student = project.results["exp_evaluation"]["distilled_logit"]
    low, high = student["accuracy_diff_ci95"]
    assert f"| {student['accuracy_diff_vs_baseline']:+.2f} [{low:+.2f} to {high:+.2f}] |" in report
    headline = next(line for line in report.splitlines() if line.startswith("Best distilled student"))
    assert f"(95% CI {low:+.2f} to {high:+.2f}, McNemar p" in headline
    assert re.search(r": (not significant|significantly (better|worse) than the baseline) on [\d,]+ test images",
                     headline), headline
    for figure in FIGURES:
        path = root / "reports" / "figures" / figure
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert f"figures/{figure}" in report


def test_everything_is_up_to_date_after_repro(project):
    assert json.loads(project.results["status"]) == {}
    second = project.results["second_repro"]
    assert stages_run(second) == []
    for stage in ALL_STAGES:
        assert f"'{stage}' didn't change, skipping" in second


def test_outputs_are_byte_identical_when_a_stage_reruns_on_the_same_inputs(project):
    r = project.results
    assert r["forced_prepare"] == ["prepare"]
    # an identical prepared split leaves everything downstream up to date
    assert json.loads(r["status_after_forced_prepare"]) == {}
    # re-trained and re-timed: only the timings moved, and the report (which shows them) is all that is stale
    assert json.loads(r["status_after_forced"]) in ({}, {"report": [{"changed deps": {"metrics": "modified"}}]})
    assert r["hashes_forced"] == r["hashes_first"]
    assert any(k.startswith("models/") for k in r["hashes_first"]) and "data/teacher_targets/meta.json" in r["hashes_first"]


def lock_outs(text: str) -> dict[str, str]:
    lock = yaml.safe_load(text)
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_changing_kd_temperature_reruns_only_distill_evaluate_export_report(project):
    assert project.results["exp_stages"] == DOWNSTREAM_OF_KD
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    assert params["kd"]["temperature"] == 3
    before = lock_outs(project.git("show", "HEAD:dvc.lock"))
    after = lock_outs((project.root / "dvc.lock").read_text())
    # the teacher and the baseline were not retrained; the distilled student was, to another result
    for path in ("models/teacher.pt", "models/baseline.pt", "data/prepared", "metrics/teacher.json",
                 "plots/history/teacher.csv", "plots/history/baseline.csv"):
        assert after[path] == before[path], path
    for path in ("models/distilled_logit.pt", "plots/history/distilled_logit.csv"):
        assert after[path] != before[path], path
    changed = project.git("status", "--porcelain")
    assert "metrics/teacher.json" not in changed and "metrics/baseline.json" not in changed
    assert "metrics/distilled_logit.json" in changed


def test_metrics_diff_shows_the_distilled_metrics(project):
    diff = project.results["metrics_diff"]
    evaluation = diff["metrics/evaluation.json"]
    old, new = project.results["evaluation"], project.results["exp_evaluation"]
    for key in STUDENT_KEYS - {"test_accuracy_ci95"}:  # DVC leaves list values out of the diff
        entry = evaluation[f"distilled_logit.{key}"]
        assert entry["old"] == old["distilled_logit"][key]
        assert entry["new"] == new["distilled_logit"][key]
    # the teacher was not retrained: same accuracy and size, only timings may move
    for key in ("test_accuracy", "params", "size_mb"):
        assert evaluation[f"teacher.{key}"]["old"] == evaluation[f"teacher.{key}"]["new"]
    distilled = diff["metrics/distilled_logit.json"]
    assert distilled["epochs"] == {"old": STUDENT_EPOCHS, "new": STUDENT_EPOCHS, "diff": 0}
    assert set(distilled) >= {"best_val_accuracy", "best_epoch", "params"} and "train_seconds" not in distilled
    assert "train_seconds" in diff["metrics/timing/distilled_logit.json"]
    # the teacher's training metrics are the committed ones, to the last digit
    for key, entry in diff["metrics/teacher.json"].items():
        assert entry["old"] == entry["new"], key


def test_plots_diff_renders_every_plot_for_both_revisions(project):
    plots = project.results["plots_diff"]
    assert not plots.get("errors"), plots.get("errors")
    data = plots["data"]
    titles = [next(iter(entry)) for entry in yaml.safe_load((project.root / "dvc.yaml").read_text())["plots"]]
    for title in [t for t in titles if not t.startswith("plots/")]:  # every named chart in dvc.yaml
        (rendered,) = data[title]
        assert rendered["type"] == "vega"
        assert set(rendered["revisions"]) == {"HEAD", "workspace"}
        assert "<DVC_METRIC_" not in json.dumps(rendered["content"])  # every anchor filled
    confusion = [k for k in data if k.startswith("plots/confusion")]
    assert {Path(k).name for k in confusion} == {"teacher.csv", "baseline.csv", "distilled_logit.csv"}


def test_exp_show_lists_the_experiment(project):
    text = json.dumps(project.results["exp_show"])
    assert EXP_NAME in text


# ------------------------------------------------------------------------------------ MLflow


@pytest.fixture(scope="module")
def mlflow_runs(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project.root}/mlflow.db")
    experiment = client.get_experiment_by_name("kdpipe")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100, order_by=["attributes.start_time ASC"])
    # the stage runs; each execution's parent run has its own test below
    return client, [run for run in runs if run.data.tags.get("kdpipe.run_kind") != "pipeline"]


def test_mlflow_has_one_run_per_stage_execution(project, mlflow_runs):
    _, runs = mlflow_runs
    names = [run.info.run_name for run in runs]
    assert names == [s for s in ALL_STAGES + FORCED + DOWNSTREAM_OF_KD if s not in NO_MLFLOW_RUN]
    assert all(run.info.status == "FINISHED" for run in runs)


def test_mlflow_nests_each_execution_under_one_parent_run(project, mlflow_runs):
    client, runs = mlflow_runs
    r = project.results
    experiment = client.get_experiment_by_name("kdpipe")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs table, not GenAI
    assert experiment.artifact_location == str(project.root.resolve() / "mlruns")
    parents = client.search_runs([experiment.experiment_id], "tags.`kdpipe.run_kind` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    # the first repro, each forced `dvc repro -f -s <stage>` (an execution of its own), the experiment
    forced = len(FORCED)
    assert [p.info.run_name for p in parents] == ([f"workspace @ {r['rev_before_repro'][:7]}"] * (1 + forced)
                                                  + [EXP_NAME])
    assert all(p.info.status == "FINISHED" for p in parents)
    n = len([s for s in ALL_STAGES if s not in NO_MLFLOW_RUN])  # runs of the first repro
    assert {run.data.tags["mlflow.parentRunId"] for run in runs[:n]} == {parents[0].info.run_id}
    for i, run in enumerate(runs[n:n + forced]):
        assert run.data.tags["mlflow.parentRunId"] == parents[1 + i].info.run_id, run.info.run_name
    assert {run.data.tags["mlflow.parentRunId"] for run in runs[n + forced:]} == {parents[-1].info.run_id}
    # each model's own training run carries its test accuracy (the exp re-trained distill@logit only)
    first = {run.info.run_name: run.data.metrics for run in runs[:n]}
    exp = {run.info.run_name: run.data.metrics for run in runs[n + forced:]}
    assert first["train_teacher"]["test_accuracy"] == pytest.approx(r["evaluation"]["teacher"]["test_accuracy"])
    assert first["train_student"]["test_accuracy"] == pytest.approx(r["evaluation"]["baseline"]["test_accuracy"])
    assert first["distill@logit"]["test_accuracy"] == pytest.approx(r["evaluation"]["distilled_logit"]["test_accuracy"])
    distilled = r["exp_evaluation"]["distilled_logit"]
    assert exp["distill@logit"]["test_accuracy"] == pytest.approx(distilled["test_accuracy"])
    assert exp["distill@logit"]["accuracy_diff_vs_baseline"] == pytest.approx(distilled["accuracy_diff_vs_baseline"])


def test_mlflow_tags(project, mlflow_runs):
    _, runs = mlflow_runs
    r = project.results
    n = len([s for s in ALL_STAGES + FORCED if s not in NO_MLFLOW_RUN])  # runs before the experiment
    for i, run in enumerate(runs):
        tags = run.data.tags
        in_exp = i >= n
        assert tags["stage"] == run.info.run_name.split("@")[0]
        assert tags["dataset"] == "digits"
        assert tags["kd_method"] == ("logit" if tags["stage"] == "distill" else "none")
        assert tags["dvc_exp_name"] == (EXP_NAME if in_exp else "")
        assert tags["git_revision"] == (r["rev_baseline"] if in_exp else r["rev_before_repro"])


def test_mlflow_params_are_flattened(project, mlflow_runs):
    _, runs = mlflow_runs
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    first, exp = by_name["distill@logit"]
    assert first.data.params["kd.temperature"] == "4.0"
    assert exp.data.params["kd.temperature"] == "3.0"
    assert exp.data.params["kd.alpha"] == "0.9"
    assert exp.data.params["student.student_cnn.widths"] == "[32, 64, 128]"
    assert exp.data.params["teacher.epochs"] == str(TEACHER_EPOCHS)
    assert exp.data.params["data.name"] == "digits"


def test_mlflow_per_epoch_and_final_metrics(project, mlflow_runs):
    client, runs = mlflow_runs
    root = project.root
    by_name = {run.info.run_name: run for run in runs}  # the latest run of each stage
    for stage, model, epochs in (("train_teacher", "teacher", TEACHER_EPOCHS),
                                 ("train_student", "baseline", STUDENT_EPOCHS),
                                 ("distill@logit", "distilled_logit", STUDENT_EPOCHS)):
        run = by_name[stage]
        history = (root / "plots" / "history" / f"{model}.csv").read_text().splitlines()
        header = history[0].split(",")
        rows = [dict(zip(header, line.split(","))) for line in history[1:]]
        logged = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in logged] == list(range(1, epochs + 1))
        assert [m.value for m in logged] == pytest.approx([float(row["val_acc"]) for row in rows])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, epochs + 1))
        summary = json.loads((root / "metrics" / f"{model}.json").read_text())
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
    kd_terms = client.get_metric_history(by_name["distill@logit"].info.run_id, "train_kd")
    assert len(kd_terms) == STUDENT_EPOCHS
    evaluation = project.results["exp_evaluation"]
    metrics = by_name["evaluate"].data.metrics
    assert metrics["distilled_logit.test_accuracy"] == pytest.approx(evaluation["distilled_logit"]["test_accuracy"])
    assert metrics["teacher.params"] == evaluation["teacher"]["params"]
