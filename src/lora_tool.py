"""``python -m src.cli lora --student DIR --lora FILE --out DIR``: a dense FLUX LoRA fused into a student folder.

The LoRA is mapped onto the student's experts by the neuron split its conversion recorded (src/models/lora.py), so
it works on a trained student too; OUT is a diffusers folder like the student's (``save_pretrained``), loadable with
``FluxMoETransformer2DModel.from_pretrained(OUT)`` and usable as ``FluxPipeline(transformer=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.atomic import replaced_folder
from src.errors import UserError
from src.folders import check_writable_dir
from src.models.loading import load_transformer
from src.models.lora import fuse_lora, read_lora


def lora(student: str, lora: str, out: str, strength: float = 1.0) -> dict[str, Any]:
    """Fuse a FLUX LoRA (trained on the dense teacher) into a student and write the result as a new folder.

    Args:
        student: The student folder (``save_pretrained`` output: a converted, pruned or MoB student, or a dense
            FLUX transformer).
        lora: The LoRA ``.safetensors`` file, in a format ``FluxPipeline.load_lora_weights`` reads (diffusers/PEFT
            keys with optional alphas or metadata, kohya, XLabs); transformer LoRAs only.
        out: The folder to create; it must not exist or be empty.
        strength: Multiplier on the LoRA's weight change (1 = as trained).
    """
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"out {out}: exists and is not an empty folder; it is kept untouched — choose a new folder")
    check_writable_dir(out, "out")
    model = load_transformer(student)
    try:
        counts = fuse_lora(model, read_lora(lora), strength=strength)
    except ValueError as err:
        raise UserError(str(err)) from None
    try:  # a full disk or a kill leaves no half-written folder
        with replaced_folder(out_dir) as partial:
            model.save_pretrained(partial)
    except OSError as err:
        raise UserError(
            f"out {out}: writing the student failed ({err.strerror or err}); nothing was left there"
        ) from None
    skipped = counts["skipped_removed_blocks"]
    print(
        f"fused {lora} into {student} → {out_dir}: {counts['modules']} modules ({counts['moe_layers']} split over "
        f"MoE experts)" + (f", {skipped} skipped (their blocks were pruned away)" if skipped else "")
    )
    return {"out": str(out_dir), **counts}
