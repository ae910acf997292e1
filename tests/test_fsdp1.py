"""Real two-process FSDP1 on CPU (gloo) through Lightning's FSDPStrategy: ``OptDiag()`` at its defaults measures the
Hessian of the union of both ranks' probe batches by finite differences on the original parameters' views of the
local shards (a nested unit and the root's own parameters, one slice empty on a rank), Adam's preconditioned sharpness
on them, global gradient norms, and leaves training bitwise as it was.

The strategy is Lightning's with two CPU-only changes (``tests/ddp_scripts/fsdp1_monitors.py``'s
``CPUFSDPStrategy``: a subclass, because the Trainer refuses a CPU accelerator for the exact type, and
``device_id=cpu`` in its FSDP1 wrapping, because Lightning passes None there, which torch 2.13 refuses without an
accelerator); everything else is the real strategy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sharded_runs import check_gradient_norms, check_preconditioned_sharpness, check_union_curvature, run_ranks

SCRIPT = Path(__file__).parent / "ddp_scripts" / "fsdp1_monitors.py"


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp1_ranks_measure_the_hessian_of_the_union_on_their_slices_and_do_no_harm(tmp_path):
    run_ranks(SCRIPT, tmp_path)
    run_ranks(SCRIPT, tmp_path, "plain")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    plain = [torch.load(tmp_path / f"plain{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, reference in zip(ranks, plain):
        assert rank["world_size"] == 2 and rank["strategy"] == "FSDPStrategy"
        assert rank["wrapped"] == "FullyShardedDataParallel"
        assert all(len(shape) == 1 for shape in rank["shapes"].values())  # 1-D slices of the parameters
        assert rank["hvp_method"] == "finite_difference" and "sharded" in rank["hvp_reason"]
        assert not rank["warnings"] and not rank["gradient_warnings"] and not rank["diagnoser_warnings"]
        # do no harm: the same slices, bit for bit, as the same run without OptDiag
        assert rank["shards"].keys() == reference["shards"].keys()
        assert all(torch.equal(rank["shards"][k], reference["shards"][k]) for k in reference["shards"])
    # the slices partition the 14 parameters (no rank holds them all); the nested unit's bias lies wholly on rank 1
    assert [sum(n for shape in rank["shapes"].values() for n in shape) for rank in ranks] == [8, 6]
    assert (0,) in ranks[0]["shapes"].values()
    check_union_curvature(ranks)  # the critical sharpness too: forwards through the root, on the slices
    check_gradient_norms(ranks)  # against the full gradient FSDP1 gathers (summon_full_params)
    check_preconditioned_sharpness(ranks)  # Adam's state on the slices; rank 0 has none for its empty slice
