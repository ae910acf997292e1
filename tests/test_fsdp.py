"""Real two-process FSDP2 on CPU (gloo) through Lightning's ModelParallelStrategy: ``OptDiag()`` at its defaults
measures the Hessian of the union of both ranks' probe batches by finite differences on the local shards, Adam's
preconditioned sharpness on them, and global gradient norms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sharded_runs import check_gradient_norms, check_preconditioned_sharpness, check_union_curvature, run_ranks

SCRIPT = Path(__file__).parent / "ddp_scripts" / "fsdp_monitors.py"


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp2_ranks_measure_the_hessian_of_the_union_on_their_shards(tmp_path):
    run_ranks(SCRIPT, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["strategy"] == "ModelParallelStrategy"
        assert rank["sharded"] == ["DTensor", "DTensor"]
        assert rank["local_numel"] == [6, 1]  # half the weight (2 x 6) and half the bias: no rank holds all 14
        assert rank["hvp_method"] == "finite_difference" and "sharded" in rank["hvp_reason"]
        assert not [k for k in rank["warnings"] if k.startswith(("hook-error", "error:", "non-finite"))]
        assert not rank["gradient_warnings"] and not rank["diagnoser_warnings"]
        assert rank["restored"] == {"shards": True, "grads": True, "rng": True, "products": True}
    check_union_curvature(ranks)
    check_gradient_norms(ranks)
    check_preconditioned_sharpness(ranks)  # Adam's lambda_max(P^-1 H) on the shards
