"""Teacher cost per architecture: one training step (forward, loss, backward, SGD) and one
batch of inference, for each teacher shape, interleaved round by round so that every
architecture sees the same machine load, with kdpipe's runtime (threads, channels_last,
bf16 where ``runtime.bf16: auto`` picks it).

What it answers: which teacher a CPU can afford. The teacher's training steps are most of a
CIFAR-sized run on a CPU without bf16, and its inference batches are the ``teacher_targets``
stage (one forward per student view).

    PYTHONPATH=src python benchmarks/teacher_step.py [--batch-size 64] [--image-size 32] [--rounds 12]

Prints one line per architecture (parameters, forward GFLOPs per image, median step and
inference milliseconds with their min and max over the rounds after two warm-up rounds), the
CPU flags that matter, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdpipe import models  # noqa: E402
from kdpipe.config import RuntimeConfig  # noqa: E402
from kdpipe.machine import cpu_flags  # noqa: E402
from kdpipe.runtime import forward_gflops, setup_runtime  # noqa: E402

# (label, arch, arch keywords): the teachers a CPU user chooses between
TEACHERS = [
    ("resnet18 width 32", "resnet18", {"width": 32}),
    ("resnet18 width 24", "resnet18", {"width": 24}),
    ("resnet18 width 16", "resnet18", {"width": 16}),
    ("fast_cnn 64-128-256", "fast_cnn", {"widths": [64, 128, 256], "stem_width": 24}),
    ("fast_cnn 64-256-256", "fast_cnn", {"widths": [64, 256, 256], "stem_width": 24}),
]
WARMUP = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (the cifar10-cpu preset's: 64)")
    parser.add_argument("--inference-batch", type=int, default=256, help="teacher_targets' batch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds after two warm-up rounds")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: runtime.threads' default)")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch_size < 2 or args.inference_batch < 1 or args.image_size < 8:
        parser.error("--rounds >= 1, --batch-size >= 2, --inference-batch >= 1 and --image-size >= 8")

    runtime = setup_runtime(RuntimeConfig(threads=args.threads), 0)
    shape = (3, args.image_size, args.image_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *shape, generator=gen).contiguous(memory_format=runtime.memory_format)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    xi = torch.randn(args.inference_batch, *shape, generator=gen).contiguous(memory_format=runtime.memory_format)

    setups = []
    for label, arch, kwargs in TEACHERS:
        torch.manual_seed(0)
        model = models.build(arch, 3, 10, args.image_size, **kwargs).to(memory_format=runtime.memory_format)
        rt = runtime.for_model(model, shape)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        setups.append((label, model, rt, opt, {"step": [], "infer": []}))

    for _ in range(WARMUP + args.rounds):
        for _label, model, rt, opt, times in setups:
            model.train()
            start = time.perf_counter()
            with rt.autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times["step"].append(time.perf_counter() - start)
            model.eval()
            start = time.perf_counter()
            with torch.inference_mode(), rt.autocast():
                model(xi)
            times["infer"].append(time.perf_counter() - start)

    flags = cpu_flags()
    print(f"batch {args.batch_size} (inference {args.inference_batch}) on 3x{args.image_size}x{args.image_size}, "
          f"threads {runtime.threads}, CPU flags: {' '.join(flags) or 'none of avx2/avx512/amx'}")
    result = {"batch_size": args.batch_size, "inference_batch": args.inference_batch, "image_size": args.image_size,
              "threads": runtime.threads, "cpu_flags": flags, "teachers": {}}
    base = None
    for label, model, rt, _opt, times in setups:
        step = [1000 * t for t in times["step"][WARMUP:]]
        infer = [1000 * t for t in times["infer"][WARMUP:]]
        med = statistics.median(step)
        base = base or med
        gflops = forward_gflops(model, shape)
        print(f"  {label:22s} {models.count_params(model) / 1e6:5.2f}M params  {gflops:5.3f} GFLOPs/img  "
              f"step {med:6.0f} ms [{min(step):.0f}, {max(step):.0f}]  "
              f"inference {statistics.median(infer):6.0f} ms [{min(infer):.0f}, {max(infer):.0f}]  "
              f"{'bf16' if rt.amp_dtype else 'fp32'}  step vs first: {med / base:.2f}x")
        result["teachers"][label] = {"params": models.count_params(model), "gflops": round(gflops, 4),
                                     "step_ms": round(med, 1), "inference_ms": round(statistics.median(infer), 1),
                                     "amp": "bf16" if rt.amp_dtype else "fp32"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
