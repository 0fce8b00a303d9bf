"""teacher_targets: the teacher's logits on every view the student will see → data/teacher_targets/."""

from kdpipe.config import load_params
from kdpipe.stage import main
from kdpipe.teacher_targets import build_teacher_targets

if __name__ == "__main__":
    main(lambda: build_teacher_targets(load_params()))
