"""download: fetch the configured data set (data.name) into data/raw/<name>/."""

from kdpipe.config import load_params
from kdpipe.data.pipeline import download
from kdpipe.stage import main

if __name__ == "__main__":
    main(lambda: download(load_params()))
