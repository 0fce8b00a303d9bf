"""train_student: the baseline, the student trained from labels only → models/baseline.pt."""

from kdpipe.config import load_params
from kdpipe.stage import main
from kdpipe.workflow import train_baseline

if __name__ == "__main__":
    main(lambda: train_baseline(load_params()), nproc=lambda: load_params().runtime.nproc)
