"""Config validation of the plug-in sections (teacher.<arch>, student.<arch>, kd.<method>),
moved here from the model and KD test files; to be merged into tests/test_config.py."""

from __future__ import annotations

import pytest

from kdpipe.config import parse_params
from kdpipe.distill.attention import AttentionSettings
from kdpipe.distill.logit import LogitSettings
from kdpipe.errors import ConfigError

# src bug: MODELS = Registry("architecture", "arch", ...) and _ModelChecks.check calls
# MODELS.get(self.arch, roles=self.role), so the message says "arch='resnet18'", not the dotted
# "student.arch='resnet18'" (test_config.py's "unknown teacher/student arch" cases fail the same way).
ARCH_KEY_BUG = pytest.mark.xfail(strict=True,
                                 reason="architecture errors name 'arch', not 'teacher.arch'/'student.arch'")


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
    pytest.param({"teacher": {"arch": "student_cnn"}}, "teacher.arch", marks=ARCH_KEY_BUG),
    pytest.param({"student": {"arch": "resnet18"}}, "student.arch", marks=ARCH_KEY_BUG),
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
        parse_params({"kd": {"logit": {"alpha": 0.5}}})


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
