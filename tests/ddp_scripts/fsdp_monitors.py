"""Two-process FSDP2 run on CPU (gloo) through Lightning's ModelParallelStrategy with ``OptDiag()`` at its defaults, as
on one device; each rank saves what it saw to OUT/rank<r>.pt.

Run as ``python fsdp_monitors.py OUT``; Lightning re-launches it for rank 1 with the same arguments.
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lightning_models import regression_data, stop_after  # noqa: E402
sys.path.insert(0, os.path.dirname(__file__))
from ddp_monitors import save_and_finish  # noqa: E402

from optdiag import OptDiag  # noqa: E402
from optdiag.curvature import FiniteDifferenceOperator, top_eigenvalues  # noqa: E402


class ShardedLinearRegression(pl.LightningModule):
    """MSE (the mean over samples and both outputs) of a linear model 6 -> 2: the Hessian is ``D^T D / n`` with
    ``D = [X 1]`` on each output's block, whatever the weights. Sharded with FSDP2 in ``configure_model`` (the layer
    and the root, as Lightning's ModelParallelStrategy asks): each rank holds one row of the weight and of the bias."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 2))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    # Adam, so that the run measures the preconditioned sharpness on the shards too. beta2 = 0.5 makes the warm-up
    # rule hold within the 8 steps: its average holds at most (1 + beta2) / (1 - beta2) = 3 squared gradients, and the
    # rule asks 90% of that, met after 5 steps (ready_after(0.5)); Adam's default 0.999 would need 51.
    BETAS = (0.9, 0.5)
    LAYOUT = [(k, j) for k in range(2) for j in range(6)] + [(k, 6) for k in range(2)]
    """For each element of the flat parameter vector (weight row by row, then the bias): its output ``k`` and its
    column ``j`` of ``D = [X 1]``; the Hessian couples two elements by ``(D^T D / n)[j, j']`` when ``k = k'``."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, betas=self.BETAS)


class FullReference(pl.Callback):
    """References only a test may afford, from gathered full tensors: the gradient norm before each optimizer step,
    and after each step the parameters as one matrix ``[W | b]`` (a row per output) and the inputs of the batch that
    the step descended (``batches[s]``: the batch of the step that ended at global step ``s``)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.params: dict[int, torch.Tensor] = {}
        self.batches: dict[int, torch.Tensor] = {}

    def full_gradient(self, trainer, pl_module) -> torch.Tensor:
        return torch.cat([p.grad.full_tensor().reshape(-1) for p in pl_module.parameters() if p.grad is not None])

    def full_matrix(self, trainer, pl_module) -> torch.Tensor:
        layer = pl_module.net[0]
        return torch.cat([layer.weight.full_tensor(), layer.bias.full_tensor()[:, None]], dim=1).detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[int(trainer.global_step) + 1] = batch[0].detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms[int(trainer.global_step)] = float(self.full_gradient(trainer, pl_module).norm())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params[int(trainer.global_step)] = self.full_matrix(trainer, pl_module)


def _restored_after_products(module, loss_fn, batches) -> dict[str, bool]:
    """Do no harm on the shards: a finite-difference operator built on the sharded module and a few products leave
    every local shard, every ``.grad`` (object and values) and the RNG bitwise as they were."""
    params = list(module.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    shards = [p.to_local().clone() for p in params]
    grads = [p.grad for p in params]
    grad_values = [g.to_local().clone() for g in grads]
    rng = torch.get_rng_state()
    op = FiniteDifferenceOperator(module, loss_fn, batches)
    top_eigenvalues(op, k=1, max_hvp=4)
    return {
        "shards": all(torch.equal(p.to_local(), s) for p, s in zip(params, shards)),
        "grads": all(p.grad is g and torch.equal(g.to_local(), v) for p, g, v in zip(params, grads, grad_values)),
        "rng": torch.equal(torch.get_rng_state(), rng),
        "products": op.n_hvp >= 4,
    }


def full_preconditioner(trainer, pl_module) -> torch.Tensor:
    """Adam's ``P = sqrt(exp_avg_sq / (1 - beta2^step)) + eps`` over the whole flat parameter vector, gathered from
    both ranks (the state's DTensors' ``full_tensor()``): the test's reference only."""
    optimizer = trainer.optimizers[0]
    parts = []
    for p in pl_module.parameters():
        state, group = optimizer.state[p], optimizer.param_groups[0]
        corrected = state["exp_avg_sq"].full_tensor() / (1 - group["betas"][1] ** float(state["step"]))
        parts.append((corrected.sqrt() + group["eps"]).reshape(-1))
    return torch.cat(parts).double()


def run_record(bundle: OptDiag, reference: "FullReference", scheduled: list, full: dict) -> dict:
    """What both FSDP scripts save of a run: the monitors' records and warnings, and the gathered reference."""
    hessian = bundle.hessian_monitor
    return {
        "history": scheduled,
        "full": {k: v for k, v in full.items() if k != "optimizer"},
        "hvp_method": hessian.hvp_method,
        "hvp_reason": hessian.hvp_reason,
        "warnings": dict(hessian.warning_counts),
        "probe": hessian.probe_set(),
        "grad_norms": {h["step"]: h["grad_norm"] for h in bundle.gradient_monitor.history},
        "reference_grad_norms": reference.norms,
        "reference_params": reference.params,
        "step_batches": reference.batches,
        "diagnoser_warnings": dict(bundle.stall_diagnoser.warning_counts),
        "gradient_warnings": dict(bundle.gradient_monitor.warning_counts),
    }


def main(out: str) -> None:
    pl.seed_everything(0)
    data = regression_data(n=512, in_features=6, out_features=2, seed=2)
    loader = DataLoader(data, batch_size=16, shuffle=False)
    bundle = OptDiag()  # the defaults, as on one device: the adaptive schedule at a 5% budget
    reference = FullReference()
    trainer = pl.Trainer(
        # planned long and ended after 8 steps: OptDiag() lends its first estimate to a fit its 5% pays for
        accelerator="cpu", devices=2, max_steps=10_000, callbacks=[bundle, reference, stop_after(8)],
        strategy=pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        default_root_dir=out, logger=pl.loggers.CSVLogger(out),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    module = ShardedLinearRegression()
    trainer.fit(module, loader)
    rank = trainer.global_rank
    hessian = bundle.hessian_monitor
    # a short run at the defaults measures lambda_max only (lambda_min and the trace join every 4th scheduled
    # snapshot); the public measure() takes a full one now, on every rank together, at the max_hvp caps
    scheduled = hessian.history
    full = hessian.measure(trainer, module, reason="final", trace=True, budgeted=False)
    preconditioner = full_preconditioner(trainer, module)  # the state measure() read: no step since
    restored = _restored_after_products(module, hessian.loss_fn, hessian.probe_set())
    local = [p.to_local().numel() for p in module.parameters()]
    save_and_finish(
        {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "sharded": [type(p).__name__ for p in module.parameters()],
            "local_numel": local,
            **run_record(bundle, reference, scheduled, full),
            "restored": restored,
            "preconditioner": preconditioner,
            "layout": module.LAYOUT,
        },
        out, rank,
    )


if __name__ == "__main__":
    main(sys.argv[1])
