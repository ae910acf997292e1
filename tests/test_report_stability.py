"""The checkpoint report for Adam: the preconditioned stability ratio from the checkpoint's saved second moments,
"warming up" before they are estimated, the reason when the checkpoint holds no optimizer state; never a "?"."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from optdiag.analysis import analyze_checkpoint
from tests import fixtures_analysis as fx

FAST = dict(max_batches=3, resolution=5, surface_resolution=3, trace_hvp=30, density_runs=1, density_steps=6)
LR = 0.01


class AdamLinearNet(fx.LinearNet):
    """``y = W x`` on whitened inputs (Hessian = identity), trained with Adam."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class SaveAt(pl.Callback):
    """Save a full checkpoint after the given optimizer steps, and the weights alone at the last one."""

    def __init__(self, folder, steps):
        self.folder, self.steps = folder, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps:
            trainer.save_checkpoint(str(self.folder / f"step{step}.ckpt"))
            if step == max(self.steps):
                trainer.save_checkpoint(str(self.folder / "weights_only.ckpt"), weights_only=True)


@pytest.fixture(scope="module")
def adam_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adam")
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(folder),
                         callbacks=[SaveAt(folder, (20, 60))])
    module = AdamLinearNet(lr=LR)
    trainer.fit(module)
    # the preconditioner at step 60, as Adam divides by it: sqrt(v / (1 - beta2^t)) + eps
    opt = trainer.optimizers[0]
    (weight,) = module.parameters()
    state = opt.state[weight]
    p = (state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))).sqrt() + 1e-8
    paths = [str(folder / name) for name in ("step20.ckpt", "step60.ckpt", "weights_only.ckpt")]
    report = analyze_checkpoint(paths, model=AdamLinearNet, **FAST)
    html_path, _ = report.write(folder / "report")
    return report, html_path.read_text(), float((1 / p).max())


def test_adam_ratio_is_read_from_the_saved_second_moments(adam_report):
    report, _, expected = adam_report
    warming, ready, weights_only = report.to_dict()["checkpoints"]
    assert ready["step"] == 60
    # H = identity (whitened inputs), so lambda_max(P^-1/2 H P^-1/2) = max 1/P
    assert ready["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-4)
    threshold = (2 + 2 * 0.9) / ((1 - 0.9) * LR)
    assert ready["stability_threshold"] == pytest.approx(threshold, rel=1e-12)
    assert ready["stability_ratio"] == pytest.approx(expected / threshold, rel=1e-4)
    assert ready["stability"] == f"{expected / threshold:.3g} of the stability threshold"

    assert warming["step"] == 20 and warming["stability_ratio"] is None
    assert warming["preconditioned_lambda_max"] is None
    assert warming["stability"] == ("stability ratio warming up (the optimizer's second-moment estimate has 20 of "
                                    "the 51 steps it needs)")
    assert weights_only["stability_ratio"] is None
    assert weights_only["stability"] == ("stability ratio unknown (the sharpness the threshold applies to was not "
                                         "measured)")
    assert any("holds no optimizer state" in note for note in weights_only["notes"])


def test_the_html_report_never_prints_a_question_mark_for_the_ratio(adam_report):
    report, page, expected = adam_report
    assert "? of the stability threshold" not in page and "stability ratio ?" not in page
    assert "warming up (the optimizer&#x27;s second-moment estimate has 20 of the 51 steps it needs)" in page
    assert "stability ratio unknown (the sharpness the threshold applies to was not measured)" in page
    ratio = report.to_dict()["checkpoints"][1]["stability_ratio"]
    assert f"<td class=\"\">{ratio:.4g}</td>" in page  # the number, in the quantities table
