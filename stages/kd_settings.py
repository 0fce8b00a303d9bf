"""kd_settings: what each KD method reads from params.yaml → data/kd_settings/<method>.json."""

from kdpipe.config import load_params
from kdpipe.kd_settings import write_kd_settings
from kdpipe.stage import main

if __name__ == "__main__":
    main(lambda: write_kd_settings(load_params()))
