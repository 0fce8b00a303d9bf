"""The `dvc plots` definitions (top-level ``plots:`` of dvc.yaml) and the custom Vega-Lite templates in
.dvc/plots/: every template is JSON with the anchors DVC fills, every plot names a template DVC can
find, and once DVC fills a template with two revisions the chart tells them apart (grouped bars, not
stacked; no text labels that pile up; readable axis titles)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc_render import VegaRenderer
from dvc_render.vega_templates import ConfusionTemplate, get_template

from tests.conftest import PROJECT_ROOT

TEMPLATE_DIR = PROJECT_ROOT / ".dvc" / "plots"
REQUIRED_ANCHORS = ("<DVC_METRIC_DATA>", "<DVC_METRIC_X>", "<DVC_METRIC_Y>", "<DVC_METRIC_TITLE>",
                    "<DVC_METRIC_X_LABEL>", "<DVC_METRIC_Y_LABEL>")
REVS = ("HEAD", "exp-kd-t2")


def plot_definitions() -> list[tuple[str, dict[str, Any]]]:
    plots = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["plots"]
    return [next(iter(entry.items())) for entry in plots]


def custom_templates() -> list[Path]:
    return sorted(TEMPLATE_DIR.glob("*.json"))


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def encodings(spec: dict) -> Iterator[tuple[str, dict]]:
    """(channel, definition) for every encoding in a spec, its layers and its facet."""
    for key, value in walk(spec):
        if key == "encoding" and isinstance(value, dict):
            yield from ((channel, d) for channel, d in value.items() if isinstance(d, dict))
        elif key == "facet" and isinstance(value, dict):
            yield ("facet", value) if "field" in value else from_facet(value)


def from_facet(facet: dict) -> tuple[str, dict]:
    channel, definition = next((k, v) for k, v in facet.items() if isinstance(v, dict) and v.get("field"))
    return channel, definition


def mark_types(spec: dict) -> set[str]:
    return {value if isinstance(value, str) else value["type"] for key, value in walk(spec) if key == "mark"}


def literal_fields(template: dict) -> set[str]:
    """Data fields a template names itself (not through an anchor), e.g. ``model``."""
    return {value for key, value in walk(template)
            if key == "field" and isinstance(value, str) and not value.startswith("<DVC_METRIC_")}


def test_there_are_custom_templates_and_every_one_is_used():
    used = {definition["template"] for _, definition in plot_definitions()}
    names = {path.stem for path in custom_templates()}
    assert names == {"models_linear", "models_bar", "models_scatter", "latency_scatter"}
    assert names <= used, f"templates no plot uses: {sorted(names - used)}"


@pytest.mark.parametrize("path", custom_templates(), ids=lambda p: p.name)
def test_template_is_vega_lite_json_with_the_dvc_anchors(path: Path):
    template = json.loads(path.read_text())  # raises on invalid JSON
    assert template["$schema"] == "https://vega.github.io/schema/vega-lite/v5.json"
    assert template["data"] == {"values": "<DVC_METRIC_DATA>"}  # DVC fails a plot without it
    assert template["title"]["text"] == "<DVC_METRIC_TITLE>"
    strings = [value for _, value in walk(template) if isinstance(value, str)]
    for anchor in REQUIRED_ANCHORS:
        assert anchor in strings, f"{path.name} lacks {anchor}"
    # DVC only replaces anchors that are a whole JSON string; one inside a longer string stays unfilled
    for value in strings:
        if "<DVC_METRIC_" in value:
            assert value.startswith("<DVC_METRIC_") and value.endswith(">") and value.count("<") == 1, value
    # axis titles come from dvc.yaml's x_label/y_label, never the raw field names
    axis_titles = [d.get("title") for channel, d in encodings(template) if channel in ("x", "y")]
    assert axis_titles and set(axis_titles) <= {"<DVC_METRIC_X_LABEL>", "<DVC_METRIC_Y_LABEL>"}


@pytest.mark.parametrize("plot_id,definition", plot_definitions(), ids=[p for p, _ in plot_definitions()])
def test_every_plot_names_a_template_dvc_finds_and_titles_its_axes(plot_id: str, definition: dict):
    name = definition["template"]
    template = get_template(name, str(TEMPLATE_DIR))  # DVC's own lookup: .dvc/plots/<name>.json, then built-ins
    assert template.content, f"{plot_id}: template {name!r} is empty"
    if (TEMPLATE_DIR / f"{name}.json").exists():
        assert template.content == json.loads((TEMPLATE_DIR / f"{name}.json").read_text())
    assert template.has_anchor("data")
    assert definition["x"] and definition["y"]
    y_fields = set(definition["y"].values()) if isinstance(definition["y"], dict) else {definition["y"]}
    for key in ("x_label", "y_label"):
        label = definition.get(key)
        assert isinstance(label, str) and label.strip(), f"{plot_id}: no {key}"
        assert "_" not in label, f"{plot_id}: {key} {label!r} looks like a raw field name"
    assert definition["y_label"] not in y_fields


def test_the_built_in_confusion_template_puts_each_revision_in_its_own_column():
    (plot_id,) = [p for p, d in plot_definitions() if d["template"] == "confusion"]
    assert plot_id == "plots/confusion"
    assert not (TEMPLATE_DIR / "confusion.json").exists()  # DVC's built-in, not a copy of it
    assert ConfusionTemplate.DEFAULT_CONTENT["facet"]["column"]["field"] == "rev"


def fill(plot_id: str, definition: dict) -> dict:
    """The template of one plot as DVC fills it for two revisions (made-up numbers)."""
    template = json.loads((TEMPLATE_DIR / f"{definition['template']}.json").read_text())
    (y_file, y_field), = definition["y"].items()
    points = []
    for rev_index, rev in enumerate(REVS):
        for model_index, model in enumerate(("teacher", "baseline", "distilled_logit")):
            for step in (1, 2):
                point = {name: str(1.5 + model_index + step) for name in literal_fields(template)}
                point.update({"model": model, definition["x"]: str(step), y_field: str(90 + rev_index + step),
                              "rev": rev, "filename": y_file, "field": y_field})
                points.append(point)
    renderer = VegaRenderer(points, plot_id, template=definition["template"], template_dir=str(TEMPLATE_DIR),
                            title=plot_id, x=definition["x"], y=y_field, x_label=definition["x_label"],
                            y_label=definition["y_label"])
    return renderer.get_filled_template()


@pytest.mark.parametrize("plot_id,definition", [(p, d) for p, d in plot_definitions() if d["template"] != "confusion"],
                         ids=[p for p, d in plot_definitions() if d["template"] != "confusion"])
def test_filled_template_tells_revisions_apart(plot_id: str, definition: dict):
    spec = fill(plot_id, definition)
    text = json.dumps(spec)
    assert "<DVC_METRIC_" not in text, "an anchor DVC does not fill"
    assert len(spec["data"]["values"]) == 2 * 3 * 2
    assert {p["rev"] for p in spec["data"]["values"]} == set(REVS)
    channels = dict(encodings(spec))
    # the legend names the revision channel in words
    legends = [d for c, d in encodings(spec) if c in ("color", "shape", "strokeDash") and d.get("field") == "rev"]
    assert legends and all(d.get("title") == "revision" for d in legends)
    assert "text" not in mark_types(spec), "text labels overlap; use the legend and tooltips"
    titles = {d.get("title") for c, d in encodings(spec) if c in ("x", "y")}
    assert {definition["x_label"], definition["y_label"]} <= titles
    if "bar" in mark_types(spec):
        assert channels["y"]["stack"] is None  # revisions side by side, never summed
        assert channels["xOffset"]["field"] == "rev"
