#!/usr/bin/env bash
# The FLUX.1-dev-width checks that need a GPU, in one script (BENCHMARKS.md, "GPU"):
#   1. the MoE layer (1S12E2A) at FLUX dims (D 3072, 4096 + 512 tokens) in bf16 against the ideal dense FFN of the
#      activated width (target <= 1.15x), benchmarks/moe_layer.py;
#   2. stage-2 (moe_kd) steps at FLUX.1-dev's block width with 2 double + 2 single blocks, 1024² latents
#      (4096 image tokens) and 512 text tokens, bf16 teacher, bf16-mixed: step time, torch.cuda.max_memory_allocated
#      and the memory plan of src/models/memory.py, benchmarks/full_width_rehearsal.py;
#   3. sampling at FLUX.1-dev widths (57 blocks, 1024², 28 steps, guidance-distilled): seconds per image of the
#      dense model, MoE-L and MoE-S next to their FLOP ratios, benchmarks/sampling.py.
# Results (JSON + the printed tables) go to the folder given, else $OUT, else results/gpu_check.
#
#   benchmarks/gpu_check.sh [--dry-run] [FOLDER]
#
# --dry-run runs the same two steps on the CPU at toy sizes (seconds): a syntax and plumbing check.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
folder="${1:-${OUT:-results/gpu_check}}"
mkdir -p "$folder"
python="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && python=.venv/bin/python

if ((dry)); then
    moe=(--dim 128 --tokens 256 --dtype fp32 --device cpu --threads 1 --repeats 2 --warmup 1 --target 1.15)
    stage=(--device cpu --threads 1 --heads 1 --double 1 --single 1 --image-tokens 16 --text-tokens 8 --stages moe_kd --steps 2)
    sampling=(--configs committed --steps 2 --batch 2 --repeats 1 --warmup 0 --threads 1)
else
    "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
        | tee "$folder/device.txt"
    moe=(--dim 3072 --tokens 4608 --dtype bf16 --device cuda --repeats 20 --warmup 5 --target 1.15)
    stage=(--device cuda --double 2 --single 2 --image-tokens 4096 --text-tokens 512 --stages moe_kd --steps 5)
    sampling=(--configs flux-dev --device cuda --dtype bf16 --repeats 2 --warmup 1)
fi

echo "== MoE layer at FLUX dims" | tee "$folder/summary.txt"
"$python" -m benchmarks.moe_layer "${moe[@]}" --layout 1S12E2A --out "$folder/moe_layer.json" | tee -a "$folder/summary.txt"
echo "== stage-2 steps at FLUX.1-dev block width" | tee -a "$folder/summary.txt"
"$python" -m benchmarks.full_width_rehearsal "${stage[@]}" --out "$folder" | tee -a "$folder/summary.txt"
echo "== sampling: seconds per image against FLOPs" | tee -a "$folder/summary.txt"
"$python" -m benchmarks.sampling "${sampling[@]}" | tee -a "$folder/summary.txt"
echo "results in $folder: summary.txt, moe_layer.json, rehearsal.json"
