"""Fidelity of a student to its teacher on same-noise pairs: PSNR, SSIM and, when its weights are local, LPIPS.

A pair is two images of the same prompt from the same noise seed (``evaluate`` fixes the seed of every (prompt,
image), so two runs' files line up by name). All three use torchmetrics on [0, 1] images (data_range 1), computed
per pair and averaged over pairs. PSNR of identical images is infinite; it is capped at ``PSNR_CAP`` dB so means
stay finite. LPIPS needs torchvision's ImageNet backbone weights in the torch hub cache (its linear heads ship with
torchmetrics); without them it is skipped with a one-line note, never an error. Legend: N pairs, H, W image size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.generate import iter_samples
from src.errors import UserError

PSNR_CAP = 100.0
_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
_noted: set[str] = set()


def lpips_weights_file(net: str = "alex") -> Path:
    """Where torchvision looks for the LPIPS backbone's ImageNet weights (the torch hub checkpoint cache)."""
    import torchvision  # heavy: only the LPIPS weights lookup needs it

    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"lpips net={net!r}: allowed {', '.join(_LPIPS_BACKBONES)}")
    url = getattr(torchvision.models, _LPIPS_BACKBONES[net]).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        print(message, file=sys.stderr)


class FidelityMeter:
    """Accumulates per-pair PSNR, SSIM (and LPIPS) over batches; ``compute`` returns their means."""

    def __init__(self, device: str | torch.device = "cpu", lpips_net: str = "alex") -> None:
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure  # heavy: fidelity only

        self.device = torch.device(device)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="none", dim=(1, 2, 3)).to(self.device)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none").to(self.device)
        self.lpips = None
        weights = lpips_weights_file(lpips_net)
        if weights.is_file():
            from torchmetrics.image import LearnedPerceptualImagePatchSimilarity  # heavy (lpips): only with weights

            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type=lpips_net, normalize=True, reduction="none")
            self.lpips.to(self.device)
        else:
            _note_once(f"note: LPIPS skipped ({lpips_net} backbone weights not in {weights.parent})")
        self.pairs = 0

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images shape={images.shape} dtype={images.dtype}: must be (N, H, W, 3) uint8")
        return torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255

    @torch.no_grad()
    def update(self, images_a: np.ndarray, images_b: np.ndarray) -> None:
        a_NCHW, b_NCHW = self._to_tensor(images_a), self._to_tensor(images_b)
        if a_NCHW.shape != b_NCHW.shape:
            raise ValueError(f"fidelity: image shapes differ, {tuple(a_NCHW.shape)} vs {tuple(b_NCHW.shape)}")
        self.psnr.update(a_NCHW, b_NCHW)
        self.ssim.update(a_NCHW, b_NCHW)
        if self.lpips is not None:
            self.lpips.update(a_NCHW, b_NCHW)
        self.pairs += len(a_NCHW)

    def per_pair(self) -> dict[str, np.ndarray]:
        """{"psnr", "ssim", "lpips" (when available)}: one value per pair, in update order (for intervals)."""
        if not self.pairs:
            raise ValueError("fidelity: no image pairs")
        values = {
            "psnr": self.psnr.compute().reshape(-1).clamp(max=PSNR_CAP),
            "ssim": self.ssim.compute().reshape(-1),
        }
        if self.lpips is not None:
            values["lpips"] = self.lpips.compute().reshape(-1)
        return {k: v.double().cpu().numpy() for k, v in values.items()}

    def compute(self) -> dict:
        """{"psnr": dB, "ssim", "lpips" (when available), "pairs"}: means over pairs."""
        if not self.pairs:
            raise ValueError("fidelity: no image pairs")
        result = {
            "psnr": float(self.psnr.compute().reshape(-1).clamp(max=PSNR_CAP).mean()),
            "ssim": float(self.ssim.compute().reshape(-1).mean()),
        }
        if self.lpips is not None:
            result["lpips"] = float(self.lpips.compute().reshape(-1).mean())
        result["pairs"] = self.pairs
        return result


def fidelity(
    images_a: np.ndarray,
    images_b: np.ndarray,
    device: str | torch.device = "cpu",
    lpips_net: str = "alex",
    batch_size: int = 16,
    per_pair: bool = False,
) -> dict:
    """Mean PSNR (dB), SSIM and LPIPS (only with local weights) over pairs of uint8 (N, H, W, 3) images.

    With ``per_pair`` the result also holds ``"per_pair"``: each metric's value for every pair, in order.
    """
    if len(images_a) != len(images_b):
        raise ValueError(f"fidelity: {len(images_a)} images vs {len(images_b)}; pairs must line up")
    meter = FidelityMeter(device, lpips_net)
    for start in range(0, len(images_a), batch_size):
        meter.update(images_a[start : start + batch_size], images_b[start : start + batch_size])
    result = meter.compute()
    if per_pair:
        result["per_pair"] = meter.per_pair()
    return result


def check_reference(reference: str | Path, metadata: list[dict], seed: int, images_per_prompt: int) -> Path:
    """A reference evaluate folder that was generated from the same prompts and seed (so pairs share noise)."""
    reference = Path(reference)
    marker = reference / "generation.json"
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    if not info.get("complete"):
        raise UserError(f"reference {reference}: not a complete evaluate output (see its generation.json)")
    if info.get("seed") != seed or info.get("images_per_prompt", 0) < images_per_prompt:
        raise UserError(
            f"reference {reference} was generated with seed={info.get('seed')}, "
            f"images_per_prompt={info.get('images_per_prompt')}; this run uses seed={seed}, "
            f"images_per_prompt={images_per_prompt}: same-noise pairs need the same seed and at least as many images"
        )
    for i, meta in enumerate(metadata):
        meta_file = reference / f"{i:05d}" / "metadata.jsonl"
        if not meta_file.is_file() or json.loads(meta_file.read_text()).get("prompt") != meta["prompt"]:
            raise UserError(f"reference {reference}: prompt {i} differs from this run's prompt set ({meta_file})")
    return reference


def fidelity_folders(
    folder: str | Path, reference: str | Path, device: str | torch.device = "cpu", batch_size: int = 16
) -> dict:
    """Fidelity of every image in ``folder`` to the image of the same name in ``reference``."""
    folder, reference = Path(folder), Path(reference)
    names = [name for name, _, _ in iter_samples(folder)]
    missing = [name for name in names if not (reference / name).is_file()]
    if missing:
        raise UserError(f"reference {reference} lacks {len(missing)} of {len(names)} images (e.g. {missing[0]})")
    meter = FidelityMeter(device)
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        meter.update(_load(folder, chunk), _load(reference, chunk))
    return meter.compute()


def _load(root: Path, names: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(root / name).convert("RGB")) for name in names])
