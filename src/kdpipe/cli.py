"""The ``kdpipe`` command (``[project.scripts]``): helpers around the DVC pipeline.

    kdpipe sweep-report [--out reports/sweep] [--method logit] [--input exp_show.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kdpipe.errors import KdpipeError


def _sweep_report(args: argparse.Namespace) -> int:
    from kdpipe.sweep import markdown_table, sweep_report

    exp_show = json.loads(open(args.input).read()) if args.input else None
    rows = sweep_report(args.out, args.method, exp_show, args.repo, args.all_commits)
    print(markdown_table(rows, args.method), end="")
    print(f"wrote {args.out}/sweep_heatmap.png and {args.out}/sweep_table.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdpipe", description="kdpipe: knowledge-distillation pipeline helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser(
        "sweep-report", help="heatmap and table of a T×alpha sweep from 'dvc exp show --json'",
        description="Read finished DVC experiments (runs 'dvc exp show --json' unless --input is given) and "
                    "write a kd.temperature × kd.alpha heatmap of the distilled student's test accuracy "
                    "(metrics/evaluation.json) and a table sorted best first.")
    sweep.add_argument("--out", default="reports/sweep", help="output folder (default: reports/sweep)")
    sweep.add_argument("--method", default="logit", help="which distilled_<method> to show (default: logit)")
    sweep.add_argument("--input", help="a saved 'dvc exp show --json' output instead of running dvc")
    sweep.add_argument("--repo", default=".", help="the project to run dvc in (default: .)")
    sweep.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD")
    sweep.set_defaults(func=_sweep_report)
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
