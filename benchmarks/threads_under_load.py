"""Benchmark: dense teacher vs MoE student sampling on a loaded machine, with torch's default threads and with the
free cores only (what ``src/threads.py`` picks when ``--threads`` is not given).

``--burners N`` starts N busy-looping processes first (other users' jobs); with 0 the machine's own load counts.
Both models sample the same prompts under the real sampler, interleaved, at each thread count; medians. The MoE
path is many small operations ending in a barrier of all threads, so one thread descheduled by another process
stalls each of them: it loses far more from oversubscription than the dense path.

    python -m benchmarks.threads_under_load --burners 1
"""

from __future__ import annotations

import argparse
import multiprocessing

import torch

from benchmarks.sampling import COMMITTED, students
from benchmarks.timing import time_interleaved
from src.models.loading import load_transformer
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.threads import busy_cores, free_cores

PROMPTS = ["a photo of a red circle and a blue square", "a photo of three green triangles"] * 4


def _burn() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burners", type=int, default=1, help="busy-looping processes to start (other jobs)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.burners)]
    for process in burners:
        process.start()
    try:
        cores = torch.get_num_threads()
        teacher = load_transformer(COMMITTED).eval()
        models = {"dense teacher": teacher, "MoE-L": students(teacher)["MoE-L 1S12E2A"]}
        sampling = SamplingConfig(steps=args.steps, cfg_scale=2.0)
        pipes = {name: ShapesPipeline(model, image_size=32, sampling=sampling) for name, model in models.items()}
        seeds = list(range(len(PROMPTS)))
        load = busy_cores()
        free = free_cores(cores, load)
        print(
            f"{cores} cores (torch default threads), {args.burners} burner(s), {load:.1f} cores busy → free "
            f"cores {free}; batch {len(PROMPTS)}, {args.steps} steps, CFG 2, median of {args.repeats}\n"
        )
        print("| threads | dense s/batch | MoE-L s/batch | MoE-L / dense |\n|---:|---:|---:|---:|")
        results = {}
        for threads in sorted({cores, free, 1}, reverse=True):
            torch.set_num_threads(threads)
            fns = {name: (lambda p=pipe: p(PROMPTS, seeds)) for name, pipe in pipes.items()}
            results[threads] = time_interleaved(fns, args.repeats, warmup=1)
            dense, moe = results[threads]["dense teacher"], results[threads]["MoE-L"]
            print(f"| {threads} | {dense:.3f} | {moe:.3f} | {moe / dense:.2f} |")
        if cores != free:
            slow = {name: results[cores][name] / results[free][name] for name in models}
            print(
                f"\ndefault threads ({cores}) vs free cores ({free}): dense {slow['dense teacher']:.2f}x the time, "
                f"MoE-L {slow['MoE-L']:.2f}x"
            )
    finally:
        for process in burners:
            process.terminate()


if __name__ == "__main__":
    main()
