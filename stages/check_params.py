"""check_params: validate all of params.yaml first → data/data_source.json.

DVC runs this stage before any other, so a bad value (data.name=mnist, kd.temperature=1e-30)
stops with kdpipe's one-sentence message instead of DVC failing on a path templated from it
or a stage training before the value is read. Its output holds only the data set's name, so
re-running it on any params change leaves the download stage up to date; for your own images
(data.name imagefolder or csv) it also holds a fingerprint of the folder or CSV, which this
stage depends on, so that adding an image re-runs download and prepare.
"""

from kdpipe import paths
from kdpipe.config import load_params
from kdpipe.data.pipeline import data_source
from kdpipe.io import write_json
from kdpipe.stage import main


def check() -> None:
    params = load_params()
    write_json(paths.DATA_SOURCE_FILE, data_source(params))
    print(f"params.yaml is valid (data set: {params.data.name})")


if __name__ == "__main__":
    main(check)
