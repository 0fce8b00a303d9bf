"""distill@METHOD: the same student, same budget, taught by the teacher → models/distilled_<method>.pt."""

import argparse

from kdpipe.config import load_params
from kdpipe.stage import main
from kdpipe.workflow import distill

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, help="one entry of kd.methods, e.g. logit")
    args = parser.parse_args()
    main(lambda: distill(load_params(), args.method))
