"""AMDIM / SimCLR negatives gathered across DDP ranks: two gloo processes holding halves of a batch give the
single-process loss and parameter gradients of the whole batch (worker: ``ddp_negatives_worker.py``); the
offset form of the NCE equals a brute-force loop; one process is untouched."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.methods.fewshot_gather import RankSlice, gather_rows
from diffusion_lab.methods.fewshot_losses import amdim_nce, nt_xent

WORKER = Path(__file__).resolve().with_name("ddp_negatives_worker.py")


def brute_amdim_nce_offset(src, trg, offset, clip, reg_weight):
    """Source row i is image ``offset + i`` of the target batch; every other target image is a negative."""
    b, d = src.shape
    n = trg.shape[0]
    trg = trg.reshape(n, d, -1)
    n_loc = trg.shape[2]
    raw = [
        [[float(src[i] @ trg[j, :, m]) / math.sqrt(d) for m in range(n_loc)] for j in range(n)]
        for i in range(b)
    ]
    reg = reg_weight * sum(v**2 for per_i in raw for per_j in per_i for v in per_j) / (b * n * n_loc)
    total = 0.0
    for i in range(b):
        clipped = [[clip * math.tanh(v / clip) for v in per_j] for per_j in raw[i]]
        neg = sum(math.exp(v) for j in range(n) if j != offset + i for v in clipped[j])
        for pos in clipped[offset + i]:
            total += pos - math.log(math.exp(pos) + neg)
    return -total / (b * n_loc), reg


@pytest.mark.parametrize("offset", [0, 2, 4])
def test_amdim_nce_with_offset_matches_brute_force(offset):
    g = torch.Generator().manual_seed(3)
    trg = torch.randn(7, 5, 2, 3, generator=g, dtype=torch.float64)
    src = 4.0 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    loss, reg = amdim_nce(src, trg, clip=3.0, reg_weight=4e-2, offset=offset)
    ref_loss, ref_reg = brute_amdim_nce_offset(src, trg, offset, 3.0, 4e-2)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert reg.item() == pytest.approx(ref_reg, rel=1e-12)


def test_amdim_nce_rejects_rows_outside_the_target_batch():
    with pytest.raises(ValueError, match="must lie in the 4 target images"):
        amdim_nce(torch.randn(3, 5), torch.randn(4, 5, 2), offset=2)
    with pytest.raises(ValueError, match="at least 2 images"):
        amdim_nce(torch.randn(1, 5), torch.randn(1, 5, 2))


def test_without_process_group_gathering_is_the_identity():
    x, y = torch.randn(3, 4), torch.randn(3, 2, 2)
    (gx, gy), where = gather_rows(x, y)
    assert gx is x and gy is y and where == RankSlice(0, 1.0)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(nt_xent(z1, z2, gather=True), nt_xent(z1, z2))
    with pytest.raises(ValueError, match="share their first dimension"):
        gather_rows(x, torch.randn(2, 4))


def _run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """Loss (mean over ranks of the rank-weighted local losses) and DDP-averaged parameter gradients of two
    gloo ranks equal the single-process AMDIM (every term) and SimCLR values on the concatenated batch, for
    equal and unequal shards; negatives from the local batch only give a different objective."""
    splits = ["4,4", "3,5"]
    outs = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    procs = [_run([str(tmp_path / "ref.pt"), "ref"])]
    procs += [_run([str(outs[r]), str(r), str(tmp_path / "init"), *splits]) for r in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    ranks = [torch.load(out, weights_only=True) for out in outs]
    assert any(k.startswith("amdim_grad/") for k in ref) and any(k.startswith("simclr_grad/") for k in ref)
    for split in splits:
        for key, value in ref.items():
            got = [rank[f"{split}/gathered/{key}"] for rank in ranks]
            if "grad/" in key:  # every rank holds the DDP average = the gradient of the whole-batch loss
                for g in got:
                    torch.testing.assert_close(g, value, rtol=1e-10, atol=1e-12, msg=f"{split} {key}")
            else:
                torch.testing.assert_close(0.5 * (got[0] + got[1]), value, rtol=1e-10, atol=1e-12)
        for key in ("amdim/loss", "simclr/loss"):  # the test can fail: local negatives change the loss
            local = 0.5 * (ranks[0][f"{split}/local/{key}"] + ranks[1][f"{split}/local/{key}"])
            assert abs(local.item() - ref[key].item()) > 0.05, (split, key)
