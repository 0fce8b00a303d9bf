"""distill@METHOD: the same student, same budget, taught by the teacher → models/distilled_<method>.pt."""

import argparse

from kdpipe.config import load_params
from kdpipe.kd_settings import read_kd_settings
from kdpipe.stage import main
from kdpipe.workflow import distill


def run(method: str) -> None:
    params = load_params()
    distill(params, method, read_kd_settings(params, method))  # the settings file this stage depends on


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, help="one entry of kd.methods, e.g. logit")
    args = parser.parse_args()
    main(lambda: run(args.method), nproc=lambda: load_params().runtime.nproc)
