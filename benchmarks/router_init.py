"""Benchmark: how a freshly converted student routes, per router initialisation ("zeros", "normal", "centroids").

A router that starts with tied logits sends every token of a layer to the same top-K experts, so stage 2 starts
with most experts unused. For each initialisation this converts the teacher of an experiment (Taylor split as the
experiment says, the same scores for all three), runs the student over held-out batches of the teacher's world
at noise levels spread over (0, 1), and prints, averaged over the MoE layers:

- dead experts: share of routed experts that received no token;
- max share: the busiest expert's share of the token assignments (2/E·… is balanced; 1/K means all on K experts);
- load entropy: entropy of the load distribution divided by log E (1 = perfectly even);
- rel. error: ‖v_student − v_teacher‖² / ‖v_teacher‖² of the top-K student (before any training).

    python -m benchmarks.router_init --config experiments/moe_l.yaml --batches 4
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from src.commands import _load_experiment
from src.models.moe import load_tracking, moe_layers
from src.models.pipeline import SamplingConfig, ShapesPipeline
from src.training.conditioning import ShapesConditioning, velocity
from src.training.experiment import DataSpec, EvalSpec, Experiment, TaylorSpec, TeacherSpec
from src.training.runner import initial_student, load_teacher, taylor_batches

INITS = ("zeros", "normal", "centroids")


def routing_stats(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict], guidance: float) -> dict:
    """Load statistics over `batches` (summed counts per layer) and the student's relative velocity error."""
    layers = moe_layers(student)
    counts_LE = [torch.zeros(layer.num_experts) for layer in layers]
    err = ref = 0.0
    with torch.no_grad(), load_tracking(student, True):
        for b in batches:
            v_s = velocity(student, b["x_t"], b["sigma"], b["inputs"], guidance).float()
            v_t = velocity(teacher, b["x_t"], b["sigma"], b["inputs"], guidance).float()
            err += (v_s - v_t).square().sum().item()
            ref += v_t.square().sum().item()
            # one forward calls every MoE layer exactly once, so last_counts is this batch's load
            for i, layer in enumerate(layers):
                counts_LE[i] += layer.last_counts.float()
    dead, top, entropy, collapsed = [], [], [], []
    for counts_E, layer in zip(counts_LE, layers):
        collapsed.append(int((counts_E > 0).sum()) <= layer.top_k)
        share_E = counts_E / counts_E.sum()
        dead.append((counts_E == 0).float().mean().item())
        top.append(share_E.max().item())
        nz = share_E[share_E > 0]
        entropy.append((-(nz * nz.log()).sum() / torch.log(torch.tensor(float(len(share_E))))).item())
    n = len(counts_LE)
    return {
        "dead_experts": sum(dead) / n,
        "collapsed_layers": sum(collapsed) / n,
        "max_share": sum(top) / n,
        "load_entropy": sum(entropy) / n,
        "rel_error": err / ref,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/moe_l.yaml")
    parser.add_argument("--teacher", default=None, help="override teacher.path")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches of 32 images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    a = _load_experiment(args.config)
    defaults = {"teacher": TeacherSpec(), "taylor": TaylorSpec(), "evaluation": EvalSpec(), "data": DataSpec()}
    a |= {k: a.get(k) or v for k, v in defaults.items()}
    if args.teacher:
        a["teacher"] = dataclasses.replace(a["teacher"], path=args.teacher)
    with tempfile.TemporaryDirectory() as tmp:
        exp = Experiment(
            name="router_init",
            teacher=a["teacher"],
            student=a["student"],
            stages=a["stages"],
            taylor=a["taylor"],
            evaluation=a["evaluation"],
            data=a["data"],
            output_dir=Path(tmp),
            seed=args.seed,
            experiment_name="router_init",
            tracking_uri=None,
        )
        teacher = load_teacher(exp).eval()
        sampling = SamplingConfig(steps=exp.evaluation.steps, cfg_scale=exp.evaluation.cfg_scale)
        conditioning = ShapesConditioning(ShapesPipeline(teacher, image_size=exp.data.image_size, sampling=sampling))
        held_out = dataclasses.replace(
            exp, seed=args.seed + 101, taylor=dataclasses.replace(exp.taylor, batches=args.batches)
        )
        batches = list(taylor_batches(held_out, conditioning, teacher))
        print(f"teacher {exp.teacher.path}, layout {exp.student.conversion.layout}, {args.batches} batches × 32 images")
        print("| router_init | dead experts | layers collapsed to K experts | max share | load entropy | rel. error |")
        print("|---|---:|---:|---:|---:|---:|")
        for init in INITS:
            conversion = dataclasses.replace(exp.student.conversion, router_init=init)
            exp.student = dataclasses.replace(exp.student, conversion=conversion, mob=None)
            student = initial_student(exp, teacher, conditioning).eval()
            s = routing_stats(student, teacher, batches, conditioning.guidance)
            print(
                f"| {init} | {100 * s['dead_experts']:.1f}% | {100 * s['collapsed_layers']:.0f}% | "
                f"{100 * s['max_share']:.1f}% | {s['load_entropy']:.3f} | {s['rel_error']:.4f} |"
            )


if __name__ == "__main__":
    main()
