"""params.yaml validation: every bad value stops at load with one sentence naming the key and value."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe.config import ConfigError, Params, flatten, load_params, params_dict, parse_params
from kdpipe.distill.base import METHODS, SharedKd
from kdpipe.validation import derived_fields
from kdpipe.config import parse_params
from kdpipe.distill.attention import AttentionSettings
from kdpipe.distill.logit import LogitSettings
from kdpipe.errors import ConfigError
from tests.conftest import PROJECT_ROOT

SHIPPED = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def with_value(dotted: str, value) -> dict:
    """The shipped params with one dotted key set (created if missing)."""
    data = copy.deepcopy(SHIPPED)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def without(dotted: str) -> dict:
    data = copy.deepcopy(SHIPPED)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    return data


# (case id, params mapping, dotted key the message must name, value text the message must show)
INVALID = [
    ("unknown dataset", with_value("data.name", "mnist"), "data.name", "'mnist'"),
    ("unknown teacher arch", with_value("teacher.arch", "resnet50"), "teacher.arch", "'resnet50'"),
    ("unknown student arch", with_value("student.arch", "vgg11"), "student.arch", "'vgg11'"),
    ("unknown kd method", with_value("kd.methods", ["logit", "hinton"]), "kd.methods", "'hinton'"),
    ("repeated kd method", with_value("kd.methods", ["logit", "logit"]), "kd.methods", "['logit', 'logit']"),
    ("empty kd methods", with_value("kd.methods", []), "kd.methods", "[]"),
    ("temperature zero", with_value("kd.temperature", 0), "kd.temperature", "=0.0 "),
    ("temperature negative", with_value("kd.temperature", -2.5), "kd.temperature", "=-2.5 "),
    ("temperature nan", with_value("kd.temperature", float("nan")), "kd.temperature", "nan"),
    ("temperature inf", with_value("kd.temperature", float("inf")), "kd.temperature", "inf"),
    ("alpha above one", with_value("kd.alpha", 1.5), "kd.alpha", "=1.5 "),
    ("alpha below zero", with_value("kd.alpha", -0.1), "kd.alpha", "=-0.1 "),
    ("alpha zero: no teacher term at all", with_value("kd.alpha", 0), "kd.alpha", "that is the baseline"),
    ("temperature so small the soft term vanishes", with_value("kd.temperature", 1e-30), "kd.temperature",
     "[0.5, 50.0]"),
    ("temperature so large every output is uniform", with_value("kd.temperature", 1000), "kd.temperature", "=1000.0 "),
    ("negative timing threads", with_value("evaluate.timing_threads", -1), "evaluate.timing_threads", "=-1 "),
    ("zero training processes", with_value("runtime.nproc", 0), "runtime.nproc", "=0 "),
    ("teacher epochs zero", with_value("teacher.epochs", 0), "teacher.epochs", "=0 "),
    ("student epochs negative", with_value("student.epochs", -3), "student.epochs", "=-3 "),
    ("teacher batch size zero", with_value("teacher.batch_size", 0), "teacher.batch_size", "=0 "),
    ("student batch size negative", with_value("student.batch_size", -8), "student.batch_size", "=-8 "),
    ("evaluate batch size zero", with_value("evaluate.batch_size", 0), "evaluate.batch_size", "=0 "),
    ("val+test leave no training data",
     with_value("data", {**SHIPPED["data"], "val_fraction": 0.5, "test_fraction": 0.5}),
     "data.val_fraction+data.test_fraction", "=1.0 "),
    ("val+test leave almost nothing",
     with_value("data", {**SHIPPED["data"], "val_fraction": 0.6, "test_fraction": 0.35}),
     "data.val_fraction+data.test_fraction", "=0.95 "),
    ("val fraction above one", with_value("data.val_fraction", 1.2), "data.val_fraction", "=1.2 "),
    ("test fraction zero", with_value("data.test_fraction", 0.0), "data.test_fraction", "=0.0 "),
    ("string for int", with_value("teacher.epochs", "5"), "teacher.epochs", "'5'"),
    ("float for int", with_value("student.epochs", 2.5), "student.epochs", "2.5"),
    ("bool for int", with_value("seed", True), "seed", "True"),
    ("string for float", with_value("kd.alpha", "high"), "kd.alpha", "'high'"),
    ("int for list", with_value("student.student_cnn.widths", 32), "student.student_cnn.widths", "=32 "),
    ("string for list", with_value("kd.methods", "logit"), "kd.methods", "'logit'"),
    ("string inside int list", with_value("student.student_cnn.widths", [32, "64"]), "student.student_cnn.widths", "'64'"),
    ("non-positive width", with_value("student.student_cnn.widths", [32, 0]), "student.student_cnn.widths", "[32, 0]"),
    ("string for bool", with_value("mlflow.enabled", "yes"), "mlflow.enabled", "'yes'"),
    ("scalar for section", with_value("data.augment", "none"), "data.augment", "'none'"),
    ("unknown literal", with_value("runtime.device", "tpu"), "runtime.device", "'tpu'"),
    ("unknown schedule", with_value("teacher.schedule", "linear"), "teacher.schedule", "'linear'"),
    ("null for required", with_value("kd.temperature", None), "kd.temperature", "None"),
    ("unknown top-level key", with_value("epochs", 3), "'epochs'", "epochs"),
    ("unknown nested key", with_value("kd.temprature", 3.0), "'kd.temprature'", "temprature"),
    ("unknown deep key", with_value("data.augment.rotate", 15), "'data.augment.rotate'", "rotate"),
    ("unknown key in a method's section", with_value("kd.dkd.gamma", 2.0), "'kd.dkd.gamma'", "warmup_epochs"),
    ("shared value set in a method's section", with_value("kd.logit.temperature", 2.0), "'kd.logit.temperature'",
     "logit_standardization."),
    ("unknown key in an architecture's section", with_value("teacher.resnet18.depth", 34), "'teacher.resnet18.depth'",
     "width"),
    ("unknown key in a source's section", with_value("data.cifar10.sha1", "x"), "'data.cifar10.sha1'", "md5"),
    ("multi_teacher without extra teachers", with_value("kd.methods", ["multi_teacher"]),
     "kd.multi_teacher.teachers", "[]"),
    ("resnet width out of range", with_value("teacher.resnet18.width", 4), "teacher.resnet18.width", "=4 "),
    ("unknown teacher mix", with_value("teacher.mix", "blend"), "teacher.mix", "'blend'"),
    ("extra teacher outside teachers/ensemble", with_value("kd.multi_teacher.teachers", ["models/teacher.pt"]),
     "kd.multi_teacher.teachers", "models/teacher.pt"),
]


@pytest.mark.parametrize(("params", "key", "value"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_params_raise_config_error_naming_key_and_value(params, key, value):
    with pytest.raises(ConfigError) as info:
        parse_params(params)
    message = str(info.value)
    assert key in message, message
    assert value in message, message
    assert "\n" not in message
    assert message.endswith("."), message
    # "what is allowed" is part of the sentence
    assert "expected" in message or "allowed" in message, message


def test_the_table_starts_from_a_valid_file():
    """Every case above changes exactly one thing: the untouched file must parse."""
    parse_params(SHIPPED)
    parse_params(without("kd.alpha"))  # a missing key takes its default


def test_code_defaults_are_the_shipped_params_key_by_key():
    """One set of defaults: a key left out of params.yaml means the shipped value, and every
    key the code knows is in the shipped file (so the file documents every param)."""
    code = flatten(params_dict(Params()))
    shipped = flatten(SHIPPED)
    assert sorted(code) == sorted(shipped)
    for key, value in code.items():
        assert value == shipped[key], f"{key}: code default {value!r}, params.yaml {shipped[key]!r}"
    assert parse_params({}) == load_params(PROJECT_ROOT / "params.yaml")


def test_a_method_reads_the_shared_values_it_declares_and_only_those():
    params = parse_params(with_value("kd.temperature", 2.5))
    assert params.kd.method("logit").temperature == 2.5
    assert params.kd.method("dkd").temperature == 2.5
    assert not hasattr(params.kd.method("attention"), "temperature")
    shared = {f for f in SharedKd.__dataclass_fields__}
    for plugin in METHODS:
        assert set(derived_fields(plugin.settings)) <= shared, plugin.name
    assert params_dict(params)["kd"]["logit"] == {"logit_standardization": False}  # no shared value in it


def test_shipped_params_file_is_valid_and_typed():
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.name == "digits"
    assert params.data.image_size in (None, 8)  # null: the data set's default (8 for digits)
    assert params.teacher.arch == "resnet18"
    assert params.student.arch == "student_cnn"
    assert params.student.arch_settings.widths == [32, 64, 128]
    assert params.teacher.arch_settings.width == 32
    assert isinstance(params.kd.temperature, float) and params.kd.temperature == SHIPPED["kd"]["temperature"]
    assert isinstance(params.kd.alpha, float) and 0 <= params.kd.alpha <= 1
    assert params.kd.methods == ["logit", "attention", "dkd"]  # multi_teacher needs kd.teachers
    assert isinstance(params.teacher.epochs, int) and params.teacher.epochs > 0
    assert isinstance(params.student.weight_decay, float)
    # The key names other tools and docs use are all there, under their sections.
    flat = flatten(params)
    for name in ("seed", "data.name", "data.image_size", "teacher.arch", "teacher.epochs", "student.arch",
                 "student.student_cnn.widths", "teacher.resnet18.width", "kd.dkd.beta", "student.epochs", "kd.temperature", "kd.alpha"):
        assert name in flat
    assert flat["kd.temperature"] == params.kd.temperature


def test_yaml_on_off_become_runtime_literals():
    text = "runtime:\n  bf16: on\n  channels_last: off\n  compile: on\n"
    raw = yaml.safe_load(text)
    assert raw["runtime"]["bf16"] is True  # what YAML 1.1 does with a bare `on`
    runtime = parse_params(raw).runtime
    assert runtime.bf16 == "on"
    assert runtime.channels_last == "off"
    assert runtime.compile is True  # a real bool field keeps the bool
    # on/off are only accepted where they are literals of the field
    with pytest.raises(ConfigError, match="runtime.device"):
        parse_params(yaml.safe_load("runtime:\n  device: on\n"))


def test_float_written_as_yaml11_string_is_read_as_number():
    params = parse_params(yaml.safe_load("teacher:\n  weight_decay: 5e-4\n"))
    assert params.teacher.weight_decay == pytest.approx(5e-4)


def test_load_params_reports_invalid_yaml_in_one_sentence(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1\nkd: :\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert "not valid YAML" in message and "line 2" in message


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def _run_stage(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "stages" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


STAGE_CASES = [
    ("prepare.py", (), yaml.safe_dump(with_value("kd.temperature", 0)), "kd.temperature"),
    ("prepare.py", (), "seed: [1\nkd: :\n", "line 2"),
    ("distill.py", ("--method", "logit"), yaml.safe_dump(with_value("data.augment.rotate", 5)), "data.augment.rotate"),
]


@pytest.mark.parametrize(("script", "args", "text", "key"), STAGE_CASES, ids=["bad value", "bad yaml", "unknown key"])
def test_stage_script_stops_with_one_sentence_and_no_work(tmp_path, script, args, text, key):
    (tmp_path / "params.yaml").write_text(text)
    done = _run_stage(script, tmp_path, *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]
    assert done.stdout == ""
    # nothing was written: no data, metrics, models, plots or MLflow store
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".kdpipe") == ["params.yaml"]  # .kdpipe: the lock folder


# --- the plug-in sections (teacher.<arch>, student.<arch>, kd.<method>) ---
@pytest.mark.parametrize("override,key", [
    ({"teacher": {"resnet18": {"pretrained": "imagenet"}}}, "'teacher.resnet18.pretrained'"),
    ({"teacher": {"mobilenet_v2": {"width": 32}}}, "'teacher.mobilenet_v2.width'"),
    ({"teacher": {"arch": "mobilenet_v2", "mobilenet_v2": {"weights_path": "/tmp/w.pth"}}},
     "teacher.mobilenet_v2.weights_path"),
    ({"teacher": {"mobilenet_v2": {"weights_path": "teachers/pretrained/../../w.pth"}}},
     "teacher.mobilenet_v2.weights_path"),
    ({"teacher": {"arch": "mobilenet_v2", "mobilenet_v2": {"freeze_backbone": True}}},
     "teacher.mobilenet_v2.freeze_backbone"),
    ({"teacher": {"mobilenet_v2": {"input_size": 16}}}, "teacher.mobilenet_v2.input_size"),
    ({"teacher": {"mobilenet_v2": {"pretrained": "places365"}}}, "teacher.mobilenet_v2.pretrained"),
    ({"teacher": {"resnet18": {"width": 4}}}, "teacher.resnet18.width"),
    ({"teacher": {"vea_resnet18": {"width": 512}}}, "teacher.vea_resnet18.width"),
    # a student-only architecture as the teacher and vice versa
    pytest.param({"teacher": {"arch": "student_cnn"}}, "teacher.arch"),
    pytest.param({"student": {"arch": "resnet18"}}, "student.arch"),
    ({"student": {"student_cnn": {"convs_per_block": 0}}}, "student.student_cnn.convs_per_block"),
    ({"student": {"student_cnn": {"widths": []}}}, "student.student_cnn.widths"),
    ({"student": {"student_cnn": {"dropout": 1.0}}}, "student.student_cnn.dropout"),
    ({"student": {"widths": [8, 16]}}, "'student.widths'"),  # the old flat key
    ({"kd": {"teachers": ["teachers/ensemble/t.pt"]}}, "'kd.teachers'"),  # the old flat key
    ({"kd": {"multi_teacher": {"teachers": ["models/teacher.pt"]}}}, "kd.multi_teacher.teachers"),
    ({"kd": {"multi_teacher": {"teachers": ["teachers/ensemble/t.pth"]}}}, "kd.multi_teacher.teachers"),
    ({"kd": {"multi_teacher": {"teachers": ["teachers/ensemble/t.pt"] * 2}}}, "kd.multi_teacher.teachers"),
    ({"kd": {"methods": ["multi_teacher"]}}, "kd.multi_teacher.teachers"),
    ({"kd": {"attention": {"beta": -1.0}}}, "kd.attention.beta"),
    ({"kd": {"attention": {"p": 0}}}, "kd.attention.p"),
    ({"kd": {"combined": {"beta": -1.0}}}, "kd.combined.beta"),
    ({"kd": {"fitnets": {"beta": -0.5}}}, "kd.fitnets.beta"),
    ({"kd": {"dkd": {"warmup_epochs": -1}}}, "kd.dkd.warmup_epochs"),
    ({"kd": {"dkd": {"temperature": 2.0}}}, "'kd.dkd.temperature'"),  # shared values are set once, under kd
    ({"kd": {"logit": {"alpha": 0.5}}}, "'kd.logit.alpha'"),
    ({"kd": {"logit": 3}}, "kd.logit"),
])
def test_section_values_are_validated_with_one_sentence(override, key):
    with pytest.raises(ConfigError) as info:
        parse_params(override)
    message = str(info.value)
    assert key in message, message
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message


def test_a_section_without_settings_says_so():
    with pytest.raises(ConfigError, match="none \\(this section takes no settings\\)"):
        parse_params({"data": {"digits": {"url": "x"}}})


def test_a_teacher_averaged_with_mirror_images_needs_mirrored_views():
    assert parse_params({"kd": {"teacher_flip": True}}).kd.logit.teacher_flip is True
    with pytest.raises(ConfigError) as info:
        parse_params({"kd": {"teacher_flip": True}, "data": {"augment": {"flip": False}}})
    message = str(info.value)
    assert message.startswith("params.yaml: kd.teacher_flip=True is not allowed; expected false while "
                              "data.augment.flip is false"), message
    assert message.endswith(".") and "\n" not in message


def test_section_values_accept_good_values():
    params = parse_params({
        "teacher": {"arch": "mobilenet_v2",
                    "mobilenet_v2": {"pretrained": "imagenet", "freeze_backbone": True, "input_size": 96,
                                     "weights_path": "teachers/pretrained/mobilenet_v2-b0353104.pth"}},
        "student": {"student_cnn": {"widths": [48, 96, 256], "convs_per_block": 2}},
        "kd": {"methods": ["multi_teacher", "dkd"], "multi_teacher": {"teachers": ["teachers/ensemble/vea.pt"]}},
    })
    assert params.teacher.arch_settings.input_size == 96 and params.teacher.mobilenet_v2.freeze_backbone
    assert params.student.arch_settings.widths == [48, 96, 256]
    assert params.kd.method("multi_teacher").teachers == ["teachers/ensemble/vea.pt"]
    vea = parse_params({"teacher": {"arch": "vea_resnet18", "vea_resnet18": {"width": 16}}}).teacher
    assert vea.arch_settings.width == 16
    # a section's check runs whether or not its architecture is selected; a method's
    # "needs" rule (at least one extra teacher) only when the method is selected
    assert parse_params({"kd": {"multi_teacher": {"teachers": []}}}).kd.method("multi_teacher").teachers == []


def test_kd_method_resolves_a_sections_own_values_and_the_shared_ones_it_reads():
    kd = parse_params({"kd": {"temperature": 3, "alpha": 0.5, "teacher_targets": "online",
                              "attention": {"beta": 10}}}).kd
    logit = kd.method("logit")
    assert isinstance(logit, LogitSettings)
    assert (logit.temperature, logit.alpha, logit.teacher_targets) == (3.0, 0.5, "online")
    attention = kd.method("attention")
    assert isinstance(attention, AttentionSettings) and attention == AttentionSettings(beta=10.0, p=2)
    assert kd.method("dkd").temperature == 3.0 and kd.method("dkd").alpha == 1.0  # dkd's own alpha
    # the defaults are the shipped params.yaml's
    default = parse_params({}).kd
    assert (default.method("logit").temperature, default.method("logit").alpha) == (4.0, 0.9)
