"""``kdpipe compare``: the HEAD run and its DVC experiments on one screen.

``dvc exp show --only-changed`` shows every metric that moved, timings included, under
column names too long for a terminal (``distilled_logit.accuracy_diff_vs_baseline``), so the
param that changed is often not rendered at all. This table has one row per run: the params
that differ between the runs shown, then each model's test accuracy with its change against
the HEAD commit's run, in short column names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.sweep import ExpRecord, exp_commits, run_exp_show
from kdpipe.validation import flatten

# params that say nothing about the run's content (where MLflow logs, the timing set-up)
IGNORED_PARAMS = ("mlflow.", "evaluate.latency_", "evaluate.timing_threads", "evaluate.wait_alone_s")


def changed_params(records: Sequence[ExpRecord]) -> list[str]:
    """The flattened param keys whose values differ between ``records``, in params.yaml order."""
    flat = [flatten(r.params) for r in records]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if not k.startswith(IGNORED_PARAMS) and len({repr(f.get(k)) for f in flat}) > 1]


def short_model_name(name: str) -> str:
    return name.removeprefix("distilled_")


def _cell(value: Any, reference: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if isinstance(reference, (int, float)) and reference != value:
        return f"{value:.2f} ({value - reference:+.2f})"
    return f"{value:.2f}"


def compare_table(commit: ExpRecord, experiments: Sequence[ExpRecord]) -> str:
    """A markdown table: the commit's run first, then each experiment, newest first."""
    records = [commit, *experiments]
    params = changed_params(records)
    models = list(dict.fromkeys(n for r in records for n in r.evaluation if "test_accuracy" in r.evaluation[n]))
    if not models:
        raise KdpipeError("no run here has test accuracies in metrics/evaluation.json; "
                          "run `dvc repro` (and commit it) or `dvc exp run` first.")
    header = ["run", *params, *(short_model_name(m) for m in models)]
    rows = []
    for r in records:
        flat = flatten(r.params)
        acc = [_cell((r.evaluation.get(m) or {}).get("test_accuracy"),
                     None if r is commit else (commit.evaluation.get(m) or {}).get("test_accuracy"))
               for m in models]
        name = f"{r.name} (HEAD)" if r is commit else r.name + (" (failed)" if r.failed else "")
        rows.append([name, *(str(flat.get(k, "–")) for k in params), *acc])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = ("Test accuracy (%) per model; in brackets the change against the HEAD run. Columns: the params that "
            "differ between these runs" + (f" ({', '.join(params)})" if params else " (none)") + ".")
    return "\n".join(lines) + "\n\n" + note + "\n"


def compare(exp_show: Any | None = None, repo: str = ".") -> str:
    """The table for the HEAD commit and its experiments (``exp_show``: a parsed
    ``dvc exp show --json``; None runs dvc in ``repo``)."""
    exp_show = run_exp_show(repo) if exp_show is None else exp_show
    for commit, experiments in exp_commits(exp_show):
        return compare_table(commit, experiments)
    raise KdpipeError("'dvc exp show' lists no commit; commit the project's first run (git commit) first.")

