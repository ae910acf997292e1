"""Two-process FSDP1 run on CPU (gloo) through Lightning's FSDPStrategy with ``OptDiag()`` at its defaults; each rank
saves what it saw to OUT/rank<r>.pt. With a second argument ``plain`` the same run without OptDiag, saving only the
final shards (OUT/plain<r>.pt): the do-no-harm reference.

Run as ``python fsdp1_monitors.py OUT [plain]``; Lightning re-launches it for rank 1 with the same arguments.
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from ddp_monitors import save_and_finish  # noqa: E402
from fsdp_monitors import FullReference, ShardedLinearRegression, run_record  # noqa: E402
from lightning_models import regression_data, stop_after  # noqa: E402

from optdiag import OptDiag  # noqa: E402


class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    """Lightning's FSDPStrategy (pytorch-lightning 2.6) with two changes, both only so that it runs on CPU:

    * its type: the Trainer refuses a CPU accelerator for the exact type FSDPStrategy (``type(strategy) is
      FSDPStrategy`` in its accelerator connector), not for a subclass;
    * ``_setup_model`` passes ``device_id=torch.device("cpu")`` where Lightning passes ``root_device.index``, None
      on CPU, which torch 2.13's FSDP1 takes for "the current accelerator" and refuses without one. The wrapping is
      otherwise Lightning's: ``FullyShardedDataParallel(module=model, ...)`` with the strategy's own sharding
      strategy, CPU offload, mixed precision and kwargs (``use_orig_params=True`` by Lightning's default).

    Everything else is the real strategy: gloo, the launcher, the optimizer set up on the original parameters,
    ``training_step`` called through the root wrapper, the distributed sampler."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)


class Nested(nn.Linear):
    """The layer FSDP1 wraps as a unit of its own (the auto-wrap policy's class); the rest belongs to the root."""


class Split(nn.Module):
    """``left(x[:, :3]) + right(x[:, 3:])``: a linear map 6 -> 2 with one bias (``left``'s), in two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.left = Nested(3, 2)
        self.right = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x[:, :3]) + self.right(x[:, 3:])


class SplitLinearRegression(ShardedLinearRegression):
    """The FSDP2 test's linear least squares (its Hessian is ``D^T D / n`` on each output's block with ``D = [X 1]``,
    columns reordered, whatever the weights) through :class:`Split`: ``left`` (weight and bias) is a nested FSDP1
    unit, ``right`` belongs to the root unit, whose parameters are gathered only in the root's own forward.
    FSDPStrategy wraps it; ``configure_model`` does nothing."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net = Split()

    LAYOUT = [(k, j) for k in range(2) for j in range(3)] + [(k, 6) for k in range(2)] + \
        [(k, 3 + j) for k in range(2) for j in range(3)]
    """As the FSDP2 model's, in this model's parameter order: ``left``'s weight and bias, then ``right``'s weight."""

    def configure_model(self) -> None:
        pass


class GatheredReference(FullReference):
    """The FSDP2 script's references, from the full tensors FSDP1 gathers (``summon_full_params``)."""

    def full_gradient(self, trainer, pl_module) -> torch.Tensor:
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, with_grads=True):
            return torch.cat([p.grad.reshape(-1) for p in pl_module.parameters() if p.grad is not None])

    def full_matrix(self, trainer, pl_module) -> torch.Tensor:
        net = pl_module.net
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            return torch.cat([net.left.weight, net.right.weight, net.left.bias[:, None]], dim=1).detach().clone()


def full_preconditioner(trainer, pl_module) -> torch.Tensor:
    """Adam's ``P = sqrt(exp_avg_sq / (1 - beta2^step)) + eps`` over the whole flat parameter vector, from the full
    optimizer state FSDP1 gathers from both ranks (``optim_state_dict``): the test's reference only."""
    optimizer = trainer.optimizers[0]
    state = FullyShardedDataParallel.optim_state_dict(trainer.strategy.model, optimizer)["state"]
    group = optimizer.param_groups[0]
    parts = []
    for name, _ in pl_module.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "")  # the state's keys are the unwrapped names
        corrected = state[name]["exp_avg_sq"] / (1 - group["betas"][1] ** float(state[name]["step"]))
        parts.append((corrected.sqrt() + group["eps"]).reshape(-1))
    return torch.cat(parts).double()


def main(out: str, plain: bool) -> None:
    pl.seed_everything(0)
    data = regression_data(n=512, in_features=6, out_features=2, seed=2)
    loader = DataLoader(data, batch_size=16, shuffle=False)
    bundle = None if plain else OptDiag()  # the defaults, as on one device
    reference = GatheredReference()
    trainer = pl.Trainer(
        # planned long and ended after 8 steps (both runs): OptDiag() lends its first estimate to a fit its 5% pays for
        accelerator="cpu", devices=2, max_steps=10_000,
        callbacks=[reference, stop_after(8)] + ([] if plain else [bundle]),
        strategy=CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({Nested})),
        default_root_dir=out, logger=pl.loggers.CSVLogger(out),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    module = SplitLinearRegression()
    trainer.fit(module, loader)
    rank = trainer.global_rank
    shards = {name: p.detach().clone() for name, p in module.named_parameters()}
    if plain:
        save_and_finish({"shards": shards}, out, rank, name="plain")
        return
    hessian = bundle.hessian_monitor
    scheduled = hessian.history
    # lambda_min and the trace join every 4th scheduled snapshot: measure() takes a full one now, on both ranks
    full = hessian.measure(trainer, module, reason="final", trace=True, budgeted=False)
    preconditioner = full_preconditioner(trainer, module)
    save_and_finish(
        {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__mro__[1].__name__,
            "wrapped": type(trainer.strategy.model).__name__,
            "shards": shards,
            "shapes": {name: tuple(p.shape) for name, p in module.named_parameters()},
            **run_record(bundle, reference, scheduled, full),
            "preconditioner": preconditioner,
            "layout": module.LAYOUT,
        },
        out, rank,
    )


if __name__ == "__main__":
    main(sys.argv[1], plain=sys.argv[2:] == ["plain"])
