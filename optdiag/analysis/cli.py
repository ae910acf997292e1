"""``optdiag analyze CKPT [CKPT ...] --model MODULE:CLASS [--data MODULE:CALLABLE] [--out DIR] ...``

Every bad input raises :class:`~optdiag.errors.UsageError`, which ``optdiag.cli`` turns into exit code 2 and one
line naming the problem.
"""

from __future__ import annotations

import argparse

import torch

from optdiag.errors import UsageError

_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}


def _int_at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``optdiag analyze``."""
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="Lightning .ckpt files or files holding a state dict (analysed in step order)")
    parser.add_argument("--model", required=True, metavar="MODULE:CLASS",
                        help="the LightningModule class (hyper-parameters come from the checkpoint), or an "
                             "nn.Module class or factory taking no arguments")
    parser.add_argument("--data", metavar="MODULE:CALLABLE",
                        help="a callable returning a DataLoader or a LightningDataModule (its train loader); "
                             "default: the module's own train_dataloader")
    parser.add_argument("--loss", metavar="MODULE:CALLABLE",
                        help="loss_fn(model, batch) -> scalar mean loss, or a criterion class such as "
                             "torch.nn:MSELoss; default: the module's training_step")
    parser.add_argument("--out", default="optdiag-report", metavar="DIR",
                        help="where report.html and report.json go (existing files are never overwritten; "
                             "default: %(default)s)")
    parser.add_argument("--max-batches", type=_positive, default=4, metavar="N",
                        help="batches of the Hessian, and the chunk size of the loss pass (default: %(default)s)")
    parser.add_argument("--loss-batches", type=_positive, default=None, metavar="N",
                        help="batches of the loss and gradient pass (default: all the data)")
    parser.add_argument("--top-k", type=_positive, default=3, metavar="K",
                        help="eigenvalues at each end of the spectrum (default: %(default)s)")
    parser.add_argument("--resolution", type=_positive, default=21, metavar="N",
                        help="points of each 1-D loss slice (default: %(default)s)")
    parser.add_argument("--surface-resolution", type=_non_negative, default=11, metavar="N",
                        help="points per side of the 2-D contour, 0 for none (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto uses CUDA when available (default: %(default)s)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="auto",
                        help="compute dtype of the curvature; auto = the model's (default: %(default)s)")
    parser.add_argument("--mode", choices=("auto", "train", "eval"), default="auto",
                        help="the function analysed: train = batch statistics with dropout off (what the "
                             "optimizer saw), eval = running statistics; auto = train when the model has "
                             "BatchNorm-like layers or its train/eval outputs differ, else eval "
                             "(default: %(default)s)")
    parser.add_argument("--hvp", choices=("auto", "exact", "finite_difference"), default="auto",
                        help="Hessian-vector products: exact double backward, finite differences of the gradient, "
                             "or auto = exact where the backward can be differentiated (default: %(default)s)")
    parser.add_argument("--seed", type=_non_negative, default=0, metavar="S",
                        help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle checkpoints fully (weights_only=False): this can run code from the file; "
                             "use only for files from a trusted source")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no summary")


def run(args: argparse.Namespace) -> int:
    """Analyse, write the report, print a summary; return the exit code (bad input raises UsageError)."""
    from optdiag.analysis.analyze import AnalysisSettings, analyze_checkpoint
    from optdiag.analysis.loading import import_object

    if args.resolution < 3:
        raise UsageError(f"--resolution must be at least 3, got {args.resolution}")
    if 0 < args.surface_resolution < 3:
        raise UsageError(f"--surface-resolution must be 0 or at least 3, got {args.surface_resolution}")
    model = import_object(args.model, "--model")
    data = import_object(args.data, "--data") if args.data else None
    loss = import_object(args.loss, "--loss") if args.loss else None
    settings = AnalysisSettings(
        max_batches=args.max_batches,
        loss_batches=args.loss_batches,
        k=args.top_k,
        resolution=args.resolution,
        surface_resolution=args.surface_resolution,
        device=args.device,
        dtype=_DTYPES[args.dtype],
        mode=args.mode,
        hvp=args.hvp,
        seed=args.seed,
        progress=not args.quiet,
    )
    report = analyze_checkpoint(
        args.checkpoints, model, data, loss=loss, trust_checkpoint=args.trust_checkpoint, settings=settings
    )
    html_path, json_path = report.write(args.out)
    if not args.quiet:
        print(report.summary())
        print(f"wrote {html_path} and {json_path}")
    return 0

