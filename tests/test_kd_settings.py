"""kdpipe.kd_settings: one file per KD method with exactly what the method reads, so a kd value
a method does not read leaves its file (and its distill stage) untouched."""

from __future__ import annotations

import json

import pytest

from kdpipe.config import parse_params
from kdpipe.distill import METHODS
from kdpipe.errors import KdpipeError
from kdpipe.kd_settings import FORMAT, read_kd_settings, resolved, write_kd_settings


def test_resolved_holds_the_methods_own_section_and_the_shared_values_it_reads():
    params = parse_params({"kd": {"temperature": 3, "alpha": 0.5, "dkd": {"beta": 8}}})
    assert resolved(params, "logit") == {
        "format": FORMAT, "method": "logit", "module": "src/kdpipe/distill/logit.py",
        "shared": {"temperature": 3.0, "alpha": 0.5, "teacher_targets": "cached", "teacher_flip": False},
        "own": {"logit_standardization": False}}
    assert resolved(params, "dkd")["shared"] == {"temperature": 3.0, "teacher_targets": "cached", "teacher_flip": False}
    assert resolved(params, "dkd")["own"] == {"alpha": 1.0, "beta": 8.0, "warmup_epochs": 5,
                                              "logit_standardization": False}
    assert resolved(params, "attention")["shared"] == {}


def test_one_file_per_method_and_only_the_readers_of_a_value_change(tmp_path):
    out = tmp_path / "kd_settings"
    out.mkdir()
    (out / "removed_method.json").write_text("{}")
    written = write_kd_settings(parse_params({}), out)
    assert sorted(p.name for p in written) == sorted(f"{m}.json" for m in METHODS.names())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # the stale file is gone
    before = {p.name: p.read_bytes() for p in written}
    write_kd_settings(parse_params({"kd": {"temperature": 3.0}}), out)
    changed = {p.name for p in out.iterdir() if p.read_bytes() != before[p.name]}
    assert changed == {f"{m}.json" for m in ("logit", "combined", "dkd", "dist", "multi_teacher")}
    write_kd_settings(parse_params({"kd": {"teacher_flip": True}}), out)  # every reader of the teacher's logits
    changed = {p.name for p in out.iterdir() if p.read_bytes() != before[p.name]}
    assert changed == {f"{m}.json" for m in ("logit", "combined", "dkd", "dist", "multi_teacher")}
    # kd.methods is read by no method; a method's own section only by that method
    write_kd_settings(parse_params({"kd": {"methods": ["logit"], "attention": {"beta": 10.0}}}), out)
    assert {p.name for p in out.iterdir() if p.read_bytes() != before[p.name]} == {"attention.json"}


def test_read_gives_the_methods_settings_and_refuses_a_stale_or_foreign_file(tmp_path):
    params = parse_params({"kd": {"temperature": 2.0, "fitnets": {"beta": 5.0}}})
    write_kd_settings(params, tmp_path)
    for method in METHODS.names():
        assert read_kd_settings(params, method, tmp_path) == params.kd.method(method)
    # a value the method does not read does not make its file stale
    assert read_kd_settings(parse_params({"kd": {"fitnets": {"beta": 5.0}}}), "fitnets", tmp_path).beta == 5.0
    with pytest.raises(KdpipeError, match="out of date with params.yaml"):
        read_kd_settings(parse_params({"kd": {"temperature": 3.0}}), "logit", tmp_path)
    (tmp_path / "dkd.json").write_text(json.dumps({"format": FORMAT, "method": "logit"}))
    with pytest.raises(KdpipeError, match="not the .* file of method 'dkd'"):
        read_kd_settings(params, "dkd", tmp_path)
    (tmp_path / "dkd.json").write_text("{not json")
    with pytest.raises(KdpipeError, match="not a readable kd_settings file"):
        read_kd_settings(params, "dkd", tmp_path)
    with pytest.raises(KdpipeError, match="run the kd_settings stage first"):
        read_kd_settings(params, "logit", tmp_path / "missing")
