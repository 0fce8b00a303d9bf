"""download: fetch the configured data set (data.name) into data/raw/<name>/."""

from kdpipe.config import load_params
from kdpipe.data.pipeline import download
from kdpipe.stage import main
from kdpipe.tracking import stage_run


def run() -> None:
    params = load_params()
    with stage_run("download", params) as tracking:
        tracking.log_metrics(download(params))


if __name__ == "__main__":
    main(run)
