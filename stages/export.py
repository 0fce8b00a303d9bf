"""export: every model to ONNX (students also to int8), checked and timed → data/onnx/, metrics/export.json."""

from kdpipe.config import load_params
from kdpipe.export import export_all
from kdpipe.stage import main

if __name__ == "__main__":
    main(lambda: export_all(load_params()))
