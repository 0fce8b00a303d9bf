"""kd_settings: each KD method's resolved settings, one small JSON file per method.

A method reads its own section ``kd.<method>`` and the shared ``kd.*`` values its settings
declare (``derived`` fields: e.g. ``logit`` reads ``kd.temperature``, ``attention`` does not).
DVC cannot express "this stage reads kd.temperature only if the method does", so the
kd_settings stage (params: the whole ``kd`` section) writes ``data/kd_settings/<method>.json``
with exactly the values each method reads, and ``distill@<method>`` depends on its own file.
A change that a method does not read leaves its file byte-identical, so DVC does not re-run
that method: ``-S kd.temperature=3`` re-trains ``logit`` and ``dkd`` but not ``attention``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe import paths
from kdpipe.config import Params
from kdpipe.distill.base import METHODS
from kdpipe.errors import KdpipeError
from kdpipe.io import atomic_path
from kdpipe.validation import as_dict, build, derived_fields

FORMAT = "kdpipe-kd-settings/1"


def resolved(params: Params, method: str) -> dict[str, Any]:
    """What ``method`` reads from params.yaml, as the file stores it."""
    plugin = METHODS.get(method)
    settings = params.kd.method(method)
    return {"format": FORMAT, "method": method, "module": plugin.file,
            "shared": {name: getattr(settings, name) for name in derived_fields(plugin.settings)},
            "own": as_dict(settings, derived_fields(plugin.settings))}


def _dump(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def write_kd_settings(params: Params, out_dir: Path = paths.KD_SETTINGS_DIR) -> list[Path]:
    """The kd_settings stage: one file per registered method (stale files are removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for method in METHODS.names():
        path = out_dir / f"{method}.json"
        with atomic_path(path) as tmp:
            Path(tmp).write_text(_dump(resolved(params, method)))
        written.append(path)
    for stale in set(out_dir.glob("*.json")) - set(written):
        stale.unlink()
    print(f"kd settings of {len(written)} methods → {out_dir}/")
    return written


def read_kd_settings(params: Params, method: str, out_dir: Path = paths.KD_SETTINGS_DIR) -> Any:
    """``method``'s settings from its kd_settings file, the dependency its distill stage declares;
    refused when params.yaml now says otherwise (the file is stale: run ``dvc repro``)."""
    path = out_dir / f"{method}.json"
    if not path.is_file():
        raise KdpipeError(f"{path} not found; run the kd_settings stage first (dvc repro kd_settings).")
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdpipeError(f"{path} is not a readable kd_settings file ({exc}); run dvc repro kd_settings.") from None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT or stored.get("method") != method:
        raise KdpipeError(f"{path} is not the {FORMAT} file of method {method!r}; run dvc repro kd_settings.")
    if stored != resolved(params, method):
        raise KdpipeError(f"{path} is out of date with params.yaml; run dvc repro (it re-runs kd_settings first).")
    plugin = METHODS.get(method)
    return build(plugin.settings, stored["own"], f"kd.{method}", given=stored["shared"])
