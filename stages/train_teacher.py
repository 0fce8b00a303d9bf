"""train_teacher: train the large teacher (teacher.*) on labels → models/teacher.pt."""

from kdpipe.config import load_params
from kdpipe.stage import main
from kdpipe.workflow import train_teacher

if __name__ == "__main__":
    main(lambda: train_teacher(load_params()), nproc=lambda: load_params().runtime.nproc)
