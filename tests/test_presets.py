"""Data-set presets: one switch per data set, params.yaml comments kept, valid values."""

from __future__ import annotations

import shutil
import sys

import pytest
import yaml

from kdpipe import presets
from kdpipe.config import load_params, parse_params
from kdpipe.data.sources import SOURCES
from kdpipe.errors import KdpipeError
from tests.conftest import PROJECT_ROOT

PRESETS_DIR = PROJECT_ROOT / "conf/presets"


@pytest.fixture
def params_copy(tmp_path):
    return shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")


def test_one_preset_per_data_set_all_setting_the_same_keys():
    # one per data source, plus machine-sized variants of a source (cifar10-cpu)
    assert set(SOURCES.names()) <= set(presets.available(PRESETS_DIR))
    for name in presets.available(PRESETS_DIR):
        assert presets.load_preset(name, PRESETS_DIR)["data.name"] in SOURCES.names()
    keys = presets.check_same_keys(PRESETS_DIR)
    assert {"data.name", "data.image_size", "data.augment.flip", "teacher.arch", "teacher.resnet18.width",
            "teacher.epochs", "student.student_cnn.widths", "student.student_cnn.convs_per_block",
            "student.epochs"} <= keys


@pytest.mark.parametrize("name", presets.available(PRESETS_DIR))
def test_apply_keeps_comments_and_gives_valid_params(params_copy, name):
    before = params_copy.read_text()
    presets.apply(name, params_copy, PRESETS_DIR)
    after = params_copy.read_text()
    params = parse_params(yaml.safe_load(after))
    assert params.data.name == presets.load_preset(name, PRESETS_DIR)["data.name"]
    for key, value in presets.load_preset(name, PRESETS_DIR).items():
        node = yaml.safe_load(after)
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert all(c in after for c in comments)  # every comment survives
    assert len(after.splitlines()) == len(before.splitlines())


@pytest.mark.parametrize("other", [n for n in presets.available(PRESETS_DIR) if n != "digits"])
def test_the_digits_preset_is_the_committed_default_and_switching_back_restores_it(params_copy, other):
    committed = params_copy.read_text()
    assert presets.apply("digits", params_copy, PRESETS_DIR) == {}  # make repro DATA=digits is the default run
    assert presets.apply(other, params_copy, PRESETS_DIR)
    presets.apply("digits", params_copy, PRESETS_DIR)
    assert presets.apply("digits", params_copy, PRESETS_DIR) == {}  # idempotent
    # the committed values again (DVC sees no params change, nothing retrains); a comment may move
    assert yaml.safe_load(params_copy.read_text()) == yaml.safe_load(committed)
    assert [c.split("#", 1)[1].strip() for c in params_copy.read_text().splitlines() if "#" in c] == \
        [c.split("#", 1)[1].strip() for c in committed.splitlines() if "#" in c]
    if other == "cifar10":  # same list lengths: byte for byte
        assert params_copy.read_text() == committed


def test_flags_for_dvc_exp_run():
    flags = presets.flags("cifar10", PRESETS_DIR)
    pairs = dict(f.split("=", 1) for f in flags[1::2])
    assert flags[::2] == ["-S"] * len(pairs)
    assert pairs["data.name"] == "cifar10" and pairs["data.image_size"] == "32"
    assert pairs["data.augment.flip"] == "true" and pairs["student.student_cnn.widths"] == "[32,64,128]"
    assert pairs["teacher.resnet18.width"] == "64"
    assert all(" " not in f for f in flags)  # safe in $(python -m kdpipe.presets cifar10 --flags)


@pytest.mark.parametrize("name", presets.available(PRESETS_DIR))
def test_flags_command_line_uses_the_architecture_sections(name, capsys):
    presets.main([name, "--flags", "--presets-dir", str(PRESETS_DIR)])
    out = capsys.readouterr().out.split()
    assert any(flag.startswith("teacher.resnet18.width=") for flag in out)
    assert any(flag.startswith("student.student_cnn.widths=[") for flag in out)
    assert not any(flag.startswith(("teacher.width=", "student.widths=")) for flag in out)  # the keys before c5fea34


def test_every_preset_applied_to_the_shipped_params_validates(tmp_path):
    names = presets.available(PRESETS_DIR)
    assert names  # the shipped presets, whatever they are
    for name in names:
        copy = shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / f"params-{name}.yaml")
        presets.apply(name, copy, PRESETS_DIR)
        params = load_params(copy)  # what every stage reads: validated, or a ConfigError
        values = presets.load_preset(name, PRESETS_DIR)
        assert params.data.name == values["data.name"] and params.teacher.arch == values["teacher.arch"]
        assert params.teacher.resnet18.width == values["teacher.resnet18.width"]
        assert params.student.student_cnn.widths == values["student.student_cnn.widths"]
        assert params.student.student_cnn.convs_per_block == values["student.student_cnn.convs_per_block"]


def test_unknown_preset(params_copy):
    with pytest.raises(KdpipeError, match="there is no preset 'mnist'; choose one of: cats_vs_dogs, cifar10"):
        presets.apply("mnist", params_copy, PRESETS_DIR)


def test_a_preset_missing_a_key_is_refused(tmp_path, params_copy):
    broken = shutil.copytree(PRESETS_DIR, tmp_path / "presets")
    (broken / "intel.yaml").write_text("data:\n  name: intel\n")
    with pytest.raises(KdpipeError, match="intel.yaml does not set .*teacher.epochs"):
        presets.apply("cifar10", params_copy, broken)


def _python(code):
    return [sys.executable, "-c", code]


def test_run_keeps_the_preset_when_the_command_succeeds(params_copy):
    assert presets.run_with_preset("cifar10", _python("pass"), params_copy, PRESETS_DIR) == 0
    assert load_params(params_copy).data.name == "cifar10"


def test_run_restores_the_previous_bytes_when_the_command_fails(params_copy, capsys):
    before = params_copy.read_bytes()
    status = presets.run_with_preset("cifar10", _python("import sys; sys.exit(3)"), params_copy, PRESETS_DIR)
    assert status == 3 and params_copy.read_bytes() == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was restored as it was before the cifar10 preset" in err
    assert "failed (exit status 3)" in err
    # a command that cannot start: the same
    assert presets.run_with_preset("cifar10", ["no-such-command-kdpipe"], params_copy, PRESETS_DIR) == 127
    assert params_copy.read_bytes() == before


def test_run_leaves_params_yaml_when_there_is_nothing_to_undo(params_copy, capsys):
    presets.apply("cifar10", params_copy, PRESETS_DIR)
    already = params_copy.read_bytes()
    assert presets.run_with_preset("cifar10", _python("raise SystemExit(1)"), params_copy, PRESETS_DIR) == 1
    assert params_copy.read_bytes() == already and "restored" not in capsys.readouterr().err
    # params.yaml edited while the command ran: the edit is kept, not overwritten
    presets.apply("digits", params_copy, PRESETS_DIR)
    edit = f"open({str(params_copy)!r}, 'a').write('# edited\\n'); raise SystemExit(1)"
    assert presets.run_with_preset("cifar10", _python(edit), params_copy, PRESETS_DIR) == 1
    assert params_copy.read_text().endswith("# edited\n")
    assert "changed while" in capsys.readouterr().err


def test_run_with_a_misspelt_preset_runs_nothing(params_copy, tmp_path):
    before = params_copy.read_bytes()
    marker = tmp_path / "ran"
    with pytest.raises(KdpipeError, match="there is no preset 'cifar'"):
        presets.run_with_preset("cifar", _python(f"open({str(marker)!r}, 'w')"), params_copy, PRESETS_DIR)
    assert not marker.exists() and params_copy.read_bytes() == before


def test_run_command_line(params_copy):
    with pytest.raises(SystemExit) as exc:
        presets.main(["cifar10", "--params", str(params_copy), "--presets-dir", str(PRESETS_DIR), "--run", "--",
                      *_python("raise SystemExit(4)")])
    assert exc.value.code == 4
    with pytest.raises(SystemExit) as exc:  # --run without a command
        presets.main(["cifar10", "--run"])
    assert exc.value.code == 2
