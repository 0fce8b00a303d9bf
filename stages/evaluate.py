"""evaluate: every model side by side on the test split → metrics/evaluation.json and plots/."""

from kdpipe.config import load_params
from kdpipe.evaluate import evaluate_all
from kdpipe.stage import main

if __name__ == "__main__":
    main(lambda: evaluate_all(load_params()))
