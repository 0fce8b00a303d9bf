"""prepare: seeded stratified train/val/test split of uint8 N×C×H×W images into data/prepared/."""

from kdpipe.config import load_params
from kdpipe.data.pipeline import prepare
from kdpipe.stage import main

if __name__ == "__main__":
    main(lambda: prepare(load_params()))
