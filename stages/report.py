"""report: the comparison table and figures → reports/report.md, reports/figures/."""

from kdpipe.config import load_params
from kdpipe.report import build_report
from kdpipe.stage import main

if __name__ == "__main__":
    main(lambda: build_report(load_params()))
