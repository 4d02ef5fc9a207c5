"""The learning-rate schedule (``src/training/schedules.py``): torch's LinearLR → CosineAnnealingLR → ConstantLR gives
the closed form ``lr_factor`` at every step, and a Lightning fit resumed from a checkpoint (also one written with the
former LambdaLR) keeps it."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from src.training.schedules import lr_factor, warmup_schedule

PEAK = 3e-4
SETTINGS = [  # (warmup, decay, total)
    (1, "cosine", 10),
    (5, "cosine", 50),
    (10, "cosine", 110),
    (200, "cosine", 1000),
    (20, "cosine", 21),
    (10, "cosine", 5),  # total ≤ warm-up: constant after the warm-up
    (0, "none", 0),  # warm-up 0 counts as 1
    (7, "none", 0),
    (3, "none", 100),
]


def _lrs(warmup: int, decay: str, total: int, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=PEAK)
    sched = warmup_schedule(opt, warmup, decay, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("warmup", "decay", "total"), SETTINGS)
def test_the_scheduler_gives_the_closed_form_at_every_step(warmup, decay, total):
    steps = 2 * max(total, warmup) + 20  # past the end of the decay: it stays at a tenth of the peak
    for step, lr in enumerate(_lrs(warmup, decay, total, steps)):
        assert lr == pytest.approx(PEAK * lr_factor(step, max(1, warmup), decay, total), rel=1e-6), step


def test_the_closed_form_warms_up_linearly_and_anneals_to_a_tenth():
    assert [lr_factor(s, 4, "cosine", 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, 4, "cosine", 14) == pytest.approx(0.55) and lr_factor(14, 4, "cosine", 14) == pytest.approx(0.1)
    assert lr_factor(30, 4, "cosine", 14) == pytest.approx(0.1) and lr_factor(30, 4, "none", 14) == 1.0


def test_bad_settings_are_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="lr_decay"):
        warmup_schedule(opt, 2, "linear", 10)
    two = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1 * i} for i in (1, 2)], lr=0.1)
    with pytest.raises(ValueError, match="one peak"):
        warmup_schedule(two, 2, "cosine", 10)


class _Recorder(L.LightningModule):
    """Records the learning rate of every optimizer step; ``legacy``: the former LambdaLR schedule."""

    def __init__(self, legacy: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.legacy = legacy
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return (self.w * batch).square().sum()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=PEAK)
        if self.legacy:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, 3, "cosine", 12))
        else:
            sched = warmup_schedule(opt, 3, "cosine", 12)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(64, 2), batch_size=2)


def _fit(module: _Recorder, steps: int, ckpt_dir, resume=None) -> list[float]:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's data-loader worker hints
        trainer.fit(module, ckpt_path=resume)
    return module.seen


def test_a_resumed_fit_keeps_the_schedule(tmp_path):
    expected = [PEAK * lr_factor(s, 3, "cosine", 12) for s in range(12)]
    full = _fit(_Recorder(), 12, tmp_path / "full")
    assert full == pytest.approx(expected, rel=1e-6)
    for step in (2, 3, 7):  # in the warm-up, at the switch to the cosine, in the cosine
        resumed = _fit(_Recorder(), 12, tmp_path / f"resumed{step}", tmp_path / "full" / f"step={step}.ckpt")
        assert resumed == full[step:], step  # bit-identical to the run that was not interrupted


def test_a_checkpoint_of_the_former_lambda_schedule_resumes(tmp_path):
    legacy = _fit(_Recorder(legacy=True), 5, tmp_path / "legacy")
    resumed = _fit(_Recorder(), 12, tmp_path / "resumed", tmp_path / "legacy" / "step=5.ckpt")
    expected = [PEAK * lr_factor(s, 3, "cosine", 12) for s in range(12)]
    assert legacy + resumed == pytest.approx(expected, rel=1e-6)
