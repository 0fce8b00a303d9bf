"""kdpipe.distill.base: the KD method registry and the objective contract.

Every method is one module ``src/kdpipe/distill/<name>.py`` (its distill stage depends on that
path) registering one constructor ``factory(inputs, settings)``; a new module is discovered
without an import line anywhere. Every objective lets gradients reach the student (and its
own learned parts), never the teacher, and keeps the teacher in eval mode."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import typing

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdpipe import models
from kdpipe.config import parse_params
from kdpipe.distill import (METHODS, BatchContext, CrossEntropyObjective, FrozenTeacher, MethodInputs,
                            MethodSettings, SharedKd)
from kdpipe.distill.base import needs_teacher_module, reads_teacher_logits
from kdpipe.errors import ConfigError
from kdpipe.runtime import setup_runtime
from kdpipe.train import TrainJob, fit
from kdpipe.validation import derived_fields
from tests.conftest import PROJECT_ROOT, build_method

SHARED_MODULES = {"base", "losses", "targets", "features"}  # what every distill stage depends on (dvc.yaml)
META = {"class_names": ["a", "b", "c", "d"], "channels": 1, "image_size": 8, "mean": [0.3], "std": [0.3]}


def _factory_signature(factory) -> inspect.Signature:
    return inspect.signature(factory.__init__ if inspect.isclass(factory) else factory)


# ---- the registry -----------------------------------------------------------------------------


def test_the_shipped_methods_are_registered():
    assert set(METHODS.names()) == {"logit", "attention", "combined", "fitnets", "dkd", "dist", "multi_teacher"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_lives_in_its_own_module_the_distill_stage_depends_on(name):
    plugin = METHODS.get(name)
    assert plugin.module == f"kdpipe.distill.{name}"
    assert plugin.file == f"src/kdpipe/distill/{name}.py"
    assert (PROJECT_ROOT / plugin.file).is_file()
    deps = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["distill"]["do"]["deps"]
    assert "src/kdpipe/distill/${item}.py" in deps
    assert {f"src/kdpipe/distill/{m}.py" for m in SHARED_MODULES} <= set(deps)
    # the stage depends on its own module and the shared ones only: no method imports another's
    tree = ast.parse((PROJECT_ROOT / plugin.file).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    distill = {m.removeprefix("kdpipe.distill.") for m in imported if m.startswith("kdpipe.distill.")}
    assert distill <= SHARED_MODULES, distill - SHARED_MODULES


def test_an_unknown_method_is_refused_with_the_list_of_known_ones():
    with pytest.raises(ConfigError) as info:
        METHODS.get("hinton")
    message = str(info.value)
    assert "kd.methods='hinton'" in message
    assert message.endswith(", ".join(METHODS.names()) + ".")
    assert "hinton" not in METHODS


@pytest.mark.parametrize("name", METHODS.names())
def test_every_constructor_takes_exactly_inputs_and_settings(name):
    plugin = METHODS.get(name)
    factory = plugin.factory
    signature = _factory_signature(factory)
    params = list(signature.parameters.values())
    if inspect.isclass(factory):
        assert params[0].name == "self"
        params = params[1:]
    assert [p.name for p in params] == ["inputs", "settings"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
               for p in params)  # no *args, no **kwargs, no optional extras
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    assert hints["inputs"] is MethodInputs and hints["settings"] is plugin.settings


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_declares_frozen_settings_reading_only_shared_kd_values(name):
    settings = METHODS.get(name).settings
    assert issubclass(settings, MethodSettings)
    assert dataclasses.is_dataclass(settings) and settings.__dataclass_params__.frozen
    assert set(derived_fields(settings)) <= {f.name for f in dataclasses.fields(SharedKd)}
    # the section of that name in params.yaml is built from it
    assert isinstance(parse_params({}).kd.method(name), settings)


def test_which_methods_need_the_live_teacher_and_which_read_its_logits():
    table = {name: (needs_teacher_module(name), reads_teacher_logits(name)) for name in METHODS.names()}
    assert table == {
        "logit": (False, True), "dkd": (False, True), "multi_teacher": (False, True),
        "attention": (True, False), "fitnets": (True, False), "combined": (True, True), "dist": (False, True),
    }


# ---- the baseline objective -------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_objective_is_the_labels_only(label_smoothing):
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16]).eval()
    objective = CrossEntropyObjective(student, label_smoothing)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    logits, losses = objective.forward_train(x, y, BatchContext(torch.arange(6), 0))
    assert set(losses) == {"ce"}
    assert torch.equal(logits, student(x))
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=label_smoothing).item(),
                                                rel=1e-6)
    assert {id(p) for p in objective.trainable_parameters()} == {id(p) for p in student.parameters()}


# ---- the contract, for every method -----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS.names())
def test_gradients_reach_the_student_only_and_teacher_stays_in_eval(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8, width=16)
    extra = models.build("student_cnn", 1, 4, 8, widths=[16, 16])
    models.save(tmp_path / "teachers/ensemble/t.pt", extra, "student_cnn", {"widths": [16, 16], "dropout": 0.2}, META)
    teacher.train()  # the objective must switch it to eval itself
    obj = build_method(method, student, teacher, meta=META, multi_teacher={"teachers": ["teachers/ensemble/t.pt"]})
    obj.train()
    frozen = [m for m in obj.modules() if isinstance(m, FrozenTeacher)]
    assert frozen and all(not m.training and not any(sub.training for sub in m.modules()) for m in frozen)
    assert not teacher.training
    teacher_params = {id(p) for m in frozen for p in m.parameters()}
    trainable = list(obj.trainable_parameters())
    assert not teacher_params & {id(p) for p in trainable}
    assert {id(p) for p in student.parameters()} <= {id(p) for p in trainable}
    before = {k: v.clone() for m in frozen for k, v in m.state_dict().items()}
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    logits, terms = obj.forward_train(x, labels, BatchContext(torch.arange(6), 9))
    assert logits.shape == (6, 4) and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    learned = [p for p in trainable if id(p) not in {id(q) for q in student.parameters()}]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)  # e.g. the FitNets regressor
    # BatchNorm statistics of the teachers did not move
    assert all(torch.equal(before[k], v) for m in frozen for k, v in m.state_dict().items())


@pytest.mark.parametrize("method", [m for m in METHODS.names() if needs_teacher_module(m)])
def test_a_live_teacher_stays_in_eval_mode_and_unchanged_through_the_training_engine(method, toy_data):
    params = parse_params({"student": {"epochs": 2, "batch_size": 32}, "runtime": {"threads": 1, "bf16": "off"},
                           "kd": {"methods": [method]}})
    runtime = setup_runtime(params.runtime, 0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8, width=16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    obj = build_method(method, student, teacher)
    extra = {k: v.clone() for k, v in obj.state_dict().items() if not k.startswith(("student.", "teacher.", "terms.",
                                                                                    "targets."))}
    result = fit(TrainJob(method, obj, toy_data, params.student, params.data.augment, runtime, 0))
    assert len(result.history) == 2
    assert all(f"train_{term}" in result.history[0] for term in obj.forward_train(
        torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), BatchContext(torch.arange(2), 0))[1])
    assert modes and not any(modes)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the method's own learned parts (the FitNets regressor) were optimised along with the student
    assert (method == "fitnets") == any(k.startswith("regressor.") for k in extra)
    assert all(not torch.equal(v, obj.state_dict()[k]) for k, v in extra.items() if v.is_floating_point()
               and "running" not in k)


# ---- a new method is one file -----------------------------------------------------------------


NEW_METHOD_CHECK = """
import json
import kdpipe
from kdpipe.config import parse_params
from kdpipe.distill import METHODS
from kdpipe.errors import ConfigError
from kdpipe.kd_settings import resolved

out = {"package": kdpipe.__file__, "names": list(METHODS.names()), "file": METHODS.get("my_kd").file}
params = parse_params({"kd": {"methods": ["logit", "my_kd"], "temperature": 2.5, "my_kd": {}}})
settings = params.kd.method("my_kd")
out["methods"] = params.kd.methods
out["settings"] = [type(settings).__name__, settings.temperature, settings.alpha, settings.teacher_targets]
out["resolved"] = resolved(params, "my_kd")
try:
    parse_params({"kd": {"my_kd": {"bogus": 1}}})
except ConfigError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""


def test_a_new_method_module_is_discovered_and_validated_like_the_shipped_ones(tmp_path):
    """A copy of distill/logit.py under a new module and name, dropped into the distill package
    of a copy of kdpipe, with no import line added anywhere: config validation knows it."""
    src = tmp_path / "src"
    shutil.copytree(PROJECT_ROOT / "src" / "kdpipe", src / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    code = (PROJECT_ROOT / "src/kdpipe/distill/logit.py").read_text()
    for old, new in (('"logit"', '"my_kd"'), ("LogitSettings", "MyKdSettings"), ("LogitKD", "MyKD")):
        assert old in code
        code = code.replace(old, new)
    (src / "kdpipe/distill/my_kd.py").write_text(code)
    done = subprocess.run([sys.executable, "-c", NEW_METHOD_CHECK], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["package"] == str(src / "kdpipe" / "__init__.py")  # the copy, not the project's package
    assert "my_kd" in out["names"] and out["file"] == "src/kdpipe/distill/my_kd.py"
    assert out["methods"] == ["logit", "my_kd"]
    assert out["settings"] == ["MyKdSettings", 2.5, 0.9, "cached"]
    assert out["resolved"]["module"] == "src/kdpipe/distill/my_kd.py"
    assert out["resolved"]["shared"] == {"temperature": 2.5, "alpha": 0.9, "teacher_targets": "cached",
                                         "teacher_flip": False}
    assert "kd.my_kd.bogus" in out.get("error", "no ConfigError"), out
