"""OptDiag on a real data set: an MLP on scikit-learn's handwritten digits whose loss stalls, and why.

scikit-learn ships the 8x8 digits with the package (1797 images, nothing is downloaded). The MLP of
``examples/digits_monitors.py`` is trained with plain SGD at lr = 0.002, far below what its curvature allows: the
loss creeps and the stall detector fires. ``optdiag.OptDiag`` (one line in the Trainer) says why (a plateau:
``lr * lambda_max`` ~ 0.002, a thousand times below the stability limit 2), with the numbers, and what to change
(raise lr tenfold). The script then trains again with the suggested learning rate, so you can see the advice work.

Usage:
    python examples/diagnose_digits.py                            # the stalling run, then the suggested fix
    python examples/diagnose_digits.py --lr 1.0 --momentum 0.9    # your own settings (this one diverges)

Reading the output: docs/reading-a-diagnosis.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import pytorch_lightning as pl
import torch
from digits_monitors import DigitsMLP, digits_loader  # the same model and data as the monitors example

import optdiag


def train(lr: float, momentum: float, steps: int, root: str) -> optdiag.OptDiag:
    """Train with OptDiag attached; return the callback (its ``diagnoses`` and summary)."""
    pl.seed_everything(0, verbose=False)
    callback = optdiag.OptDiag()  # the one line: gradient monitor, Hessian monitor and stall diagnoser
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], default_root_dir=root, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         logger=pl.loggers.TensorBoardLogger(root, name="digits"), log_every_n_steps=10)
    trainer.fit(DigitsMLP(lr=lr, momentum=momentum), digits_loader())
    return callback


def report(callback: optdiag.OptDiag) -> None:
    for d in callback.diagnoses:
        print(f"\nstep {d.step}: {d.kind} (confidence {d.confidence:.2f})\n  {d.summary}")
        for name in ("lr", "lambda_max", "stability_threshold", "lr_lambda_max", "grad_cosine", "lambda_min"):
            if name in d.evidence:
                print(f"  {name:>20} = {d.evidence[name]:.4g}")
        for s in d.suggestions:
            print(f"  -> {s.action} ({s.target}: {s.current} -> {s.proposed}); {s.reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: a too-small 0.002)")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning_fabric"):  # no banner lines between the verdicts
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    with tempfile.TemporaryDirectory() as root:
        callback = train(args.lr or 0.002, args.momentum, args.steps, root)
        report(callback)
        if args.lr is not None:
            return
        advice = [s for d in callback.diagnoses for s in d.suggestions if s.target == "lr" and s.proposed]
        if advice:
            print(f"\nTraining again with the suggested lr = {advice[0].proposed:.4g} ...")
            report(train(advice[0].proposed, args.momentum, args.steps, root))


if __name__ == "__main__":
    main()
