"""Real two-process DDP on CPU (gloo): estimates are those of the union of the ranks' probe batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optdiag.tensorboard_plugin.local import free_port

SCRIPT = Path(__file__).parent / "ddp_scripts" / "ddp_monitors.py"


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_reduce_to_the_hessian_of_the_union_and_only_rank_zero_logs(tmp_path):
    # a free port: a fixed one collides with any other run of this suite on the machine
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)  # a deadlock ends here instead of hanging the suite
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert [h["step"] for h in h0] == [2, 4] and [h["step"] for h in h1] == [2, 4]
    for a, b in zip(h0, h1):  # identical reduced products -> identical Lanczos on both ranks
        for key in ("lambda_max", "lambda_min", "hessian_trace", "batch_sharpness", "probe_grad_norm", "n_hvp",
                    "critical_sharpness", "directional_curvature", "n_forward"):  # the line's losses are summed too
            assert a[key] == b[key], key
        # the step's own batches, not the probe set: a Rayleigh quotient of another batch's Hessian, which for these
        # Gaussian inputs stays within a factor 2 of the probe set's
        assert a["critical_sharpness"] is not None and 0 < a["directional_curvature"] <= 2 * a["lambda_max"]
    # the ranks saw different probe batches; the estimate is the Hessian of all four together
    x0 = torch.cat([b[0] for b in ranks[0]["probe"]])
    x1 = torch.cat([b[0] for b in ranks[1]["probe"]])
    assert not torch.equal(x0, x1)
    x = torch.cat([x0, x1]).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    eig = np.linalg.eigvalsh((2 * design.T @ design / len(x)).numpy())
    assert h0[0]["probe_batch_size"] == 64
    assert h0[0]["lambda_max"] == pytest.approx(eig[-1], rel=1e-4)
    assert h0[0]["lambda_min"] == pytest.approx(eig[0], rel=1e-3)
    assert h0[0]["hessian_trace"] == pytest.approx(eig.sum(), rel=1e-4)
    # gradients are all-reduced by DDP before the optimizer step: both ranks measure the same norm
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"]
    assert ranks[0]["logger_calls"] > 0 and ranks[1]["logger_calls"] == 0
    # the adaptive schedule: both ranks priced their snapshots and took them at the same steps (rank 0's clock
    # decides); a stall snapshot's go-ahead is rank 0's on every rank
    assert ranks[0]["adaptive_estimate"] > 0 and ranks[1]["adaptive_estimate"] > 0
    assert ranks[0]["adaptive_steps"] == ranks[1]["adaptive_steps"]
    assert ranks[0]["affordable"] is True and ranks[1]["affordable"] is True
