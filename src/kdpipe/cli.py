"""The ``kdpipe`` command (``[project.scripts]``): helpers around the DVC pipeline.

    kdpipe compare [--input exp_show.json]
    kdpipe sweep --temperatures 1,2,4 --alphas 0.5,0.9 [--jobs 2] [--set KEY=VALUE] [--target STAGE]
    kdpipe sweep-report [--out reports/sweep] [--method logit] [--input exp_show.json]
    kdpipe replicate --seeds N [--first 1] [--jobs 1]
    kdpipe replicate-report [--out reports/replicates] [--input exp_show.json]
    kdpipe ui-url [--port 5000]
    kdpipe predict MODEL IMAGE... [--top-k 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kdpipe.errors import KdpipeError


def _read_exp_show(path: str | None) -> object:
    """A saved ``dvc exp show --json`` output, or None (then dvc is run)."""
    if path is None:
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdpipeError(f"--input {path!r} is not a readable 'dvc exp show --json' file ({exc}).") from None
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise KdpipeError(f"--input {path!r} is JSON but not 'dvc exp show --json' output (a list of commits).")
    return data


def _compare(args: argparse.Namespace) -> int:
    from kdpipe.compare import compare

    print(compare(_read_exp_show(args.input), args.repo), end="")
    return 0


def _sweep_report(args: argparse.Namespace) -> int:
    from kdpipe.sweep import markdown_table, sweep_report

    exp_show = _read_exp_show(args.input)
    rows = sweep_report(args.out, args.method, exp_show, args.repo, args.all_commits)
    print(markdown_table(rows, args.method), end="")
    print(f"wrote {args.out}/sweep_heatmap.png and {args.out}/sweep_table.md")
    return 0


def _numbers(text: str, option: str) -> list[float]:
    """``1,2,4`` as numbers, or one sentence naming the option."""
    try:
        return [float(token) for token in text.split(",") if token.strip()]
    except ValueError:
        raise KdpipeError(f"{option} {text!r}: expected numbers separated by commas, e.g. {option} 1,2,4.") from None


def _sweep(args: argparse.Namespace) -> int:
    from kdpipe.expqueue import tracking_note
    from kdpipe.sweep import run_sweep

    if args.jobs < 1:
        raise KdpipeError(f"--jobs {args.jobs}: expected --jobs >= 1.")
    temperatures, alphas = _numbers(args.temperatures, "--temperatures"), _numbers(args.alphas, "--alphas")
    print(tracking_note(args.repo))
    states = run_sweep(temperatures, alphas, args.repo, args.jobs, args.set, args.target, timeout_seconds=args.timeout)
    print(f"{len(states)} sweep experiments finished; draw them with: kdpipe sweep-report --out reports/sweep")
    return 0


def _replicate(args: argparse.Namespace) -> int:
    from kdpipe.expqueue import tracking_note
    from kdpipe.replicate import run_replicates

    if args.seeds < 1 or args.first < 0 or args.jobs < 1:
        raise KdpipeError(f"--seeds {args.seeds} --first {args.first} --jobs {args.jobs}: expected --seeds >= 1, "
                          "--first >= 0 and --jobs >= 1.")
    seeds = list(range(args.first, args.first + args.seeds))
    print(tracking_note(args.repo))
    states = run_replicates(seeds, args.repo, args.jobs, timeout_seconds=args.timeout)
    print(f"{len(states)} replicates finished ({', '.join(states)}); "
          "aggregate them with: kdpipe replicate-report --out reports/replicates")
    return 0


def _replicate_report(args: argparse.Namespace) -> int:
    from kdpipe.replicate import FIGURE_FILE, TABLE_FILE, markdown_table, replicate_report

    exp_show = _read_exp_show(args.input)
    replicates = replicate_report(args.out, exp_show, args.repo)
    print(markdown_table(replicates), end="")
    print(f"{len(replicates)} replicates (student seeds {', '.join(str(r.seed) for r in replicates)}); "
          f"wrote {args.out}/{TABLE_FILE} and {args.out}/{FIGURE_FILE}")
    return 0


def _ui_url(args: argparse.Namespace) -> int:
    from kdpipe.config import load_params
    from kdpipe.tracking import experiment_url

    print(experiment_url(load_params(args.params), f"http://{args.host}:{args.port}"))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from kdpipe.predict import run_predict

    return run_predict(args.model, args.images, args.top_k, args.json)


def _exp_show_source(sub: argparse.ArgumentParser) -> None:
    """--input and --repo: where a subcommand reads ``dvc exp show --json`` from."""
    sub.add_argument("--input", help="a saved 'dvc exp show --json' output instead of running dvc")
    sub.add_argument("--repo", default=".", help="the project to run dvc in (default: .)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdpipe", description="kdpipe: knowledge-distillation pipeline helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare", help="the HEAD run and its experiments on one screen: changed params, accuracy per model",
        description="Read 'dvc exp show --json' (or --input) and print one row per run (the HEAD commit's, then "
                    "its experiments): the params that differ between them and each model's test accuracy with "
                    "its change against the HEAD run. Timings are left out (metrics/timing/).")
    _exp_show_source(cmp)
    cmp.set_defaults(func=_compare)

    grid = sub.add_parser(
        "sweep", help="queue a kd.temperature × kd.alpha grid and run it with N parallel workers",
        description="Queue one DVC experiment per grid point (dvc exp run --queue -n sweep-T<t>-a<a> "
                    "-S kd.temperature=<t> -S kd.alpha=<a>), start N queue workers (dvc queue start -j N) and wait "
                    "for all of them; then kdpipe sweep-report draws the grid. Every worker logs to the MLflow "
                    "store of MLFLOW_TRACKING_URI as set here (e.g. a team server, make server).")
    grid.add_argument("--temperatures", required=True, help="kd.temperature values, e.g. 1,2,4")
    grid.add_argument("--alphas", required=True, help="kd.alpha values, e.g. 0.5,0.9")
    grid.add_argument("--jobs", type=int, default=1, help="parallel queue workers (default: 1)")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="another -S override for every point, e.g. --set 'kd.methods=[logit]' (repeatable)")
    grid.add_argument("--target", action="append", default=[], metavar="STAGE",
                      help="run each experiment up to this stage only, e.g. --target evaluate (repeatable)")
    grid.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    grid.add_argument("--repo", default=".", help="the project to run dvc in (default: .)")
    grid.set_defaults(func=_sweep)

    sweep = sub.add_parser(
        "sweep-report", help="heatmap and table of a T×alpha sweep from 'dvc exp show --json'",
        description="Read finished DVC experiments (runs 'dvc exp show --json' unless --input is given) and "
                    "write a kd.temperature × kd.alpha heatmap of the distilled student's test accuracy "
                    "(metrics/evaluation.json) and a table sorted best first.")
    sweep.add_argument("--out", default="reports/sweep", help="output folder (default: reports/sweep)")
    sweep.add_argument("--method", default="logit", help="which distilled_<method> to show (default: logit)")
    _exp_show_source(sweep)
    sweep.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD")
    sweep.set_defaults(func=_sweep_report)

    rep = sub.add_parser(
        "replicate", help="queue and run N experiments that differ only in student.seed",
        description="Queue one DVC experiment per student seed (dvc exp run --queue -n seed-<s> -S student.seed=<s>, "
                    "s = first .. first+N-1), start the queue and wait for them. The split and the teacher keep "
                    "the global seed, so they come from DVC's cache; the students and teacher_targets re-run.")
    rep.add_argument("--seeds", type=int, required=True, help="number of replicates N")
    rep.add_argument("--first", type=int, default=1, help="first student seed (default: 1)")
    rep.add_argument("--jobs", type=int, default=1, help="parallel queue workers (default: 1)")
    rep.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    rep.add_argument("--repo", default=".", help="the project to run dvc in (default: .)")
    rep.set_defaults(func=_replicate)

    rep_report = sub.add_parser(
        "replicate-report", help="mean ± std and paired differences of seed replicates",
        description="Read 'dvc exp show --json' (or --input), take the HEAD commit's run and its experiments that "
                    "differ from it only in student.seed, and write a markdown table and a figure: test accuracy "
                    "per model (mean ± std over seeds) and every distilled model's paired difference against the "
                    "baseline (mean, 95% t-interval, wins).")
    rep_report.add_argument("--out", default="reports/replicates", help="output folder (default: reports/replicates)")
    _exp_show_source(rep_report)
    rep_report.set_defaults(func=_replicate_report)

    ui = sub.add_parser(
        "ui-url", help="the MLflow UI address of the experiment's runs table",
        description="Print the address that opens mlflow.experiment on its runs table (MLflow 3's UI opens "
                    "an experiment in its GenAI view unless the address asks for workflowType=machine_learning "
                    "or the sidebar switch was set to Machine learning in that browser).")
    ui.add_argument("--host", default="127.0.0.1", help="host the UI listens on (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port the UI listens on (default: 5000)")
    ui.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    ui.set_defaults(func=_ui_url)

    pred = sub.add_parser(
        "predict", help="classify image files with a .pt or .onnx model",
        description="Classify PNG/JPEG files (any size and mode: converted and resized to what the model file "
                    "says) with a kdpipe model, models/<name>.pt or data/onnx/<name>[.int8].onnx, and print the "
                    "most probable classes. A file that is not an image is reported on stderr and the others are "
                    "still classified; the exit status is then 1.")
    pred.add_argument("model", help="a .pt or .onnx model file")
    pred.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    pred.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: 3)")
    pred.add_argument("--json", action="store_true",
                      help='one JSON object per image and line: {"path": ..., "predictions": [{"class": ..., '
                           '"probability": ...}, ...]}, highest first')
    pred.set_defaults(func=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KdpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
