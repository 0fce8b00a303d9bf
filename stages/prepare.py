"""prepare: seeded stratified train/val/test split of uint8 N×C×H×W images into data/prepared/."""

from kdpipe import paths
from kdpipe.config import load_params
from kdpipe.data.pipeline import prepare
from kdpipe.stage import main
from kdpipe.tracking import stage_run


def run() -> None:
    params = load_params()
    with stage_run("prepare", params) as tracking:
        tracking.log_metrics(prepare(params))
        tracking.log_artifact(paths.METRICS_DIR / "data.json")


if __name__ == "__main__":
    main(run)
