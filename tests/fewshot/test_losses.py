"""The few-shot math against brute-force loops: AMDIM NCE / infomax, SimCLR NT-Xent, ProtoNet, the 95% CI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_lab.methods.fewshot_losses import (
    amdim_infomax,
    amdim_nce,
    mean_confidence_interval,
    nt_xent,
    protonet_logits,
    prototypes,
    tanh_clip,
)


def brute_amdim_nce(src, trg, clip, reg_weight):
    """Loops over (i, l) and the negatives (j != i, every location m), straight from the definition."""
    b, d = src.shape
    trg = trg.reshape(b, d, -1)
    n_loc = trg.shape[2]
    raw = [
        [[float(src[i] @ trg[j, :, m]) / math.sqrt(d) for m in range(n_loc)] for j in range(b)]
        for i in range(b)
    ]
    reg = (
        reg_weight
        * sum(raw[i][j][m] ** 2 for i in range(b) for j in range(b) for m in range(n_loc))
        / (b * b * n_loc)
    )
    score = [
        [[clip * math.tanh(raw[i][j][m] / clip) for m in range(n_loc)] for j in range(b)] for i in range(b)
    ]
    total = 0.0
    for i in range(b):
        neg = sum(math.exp(score[i][j][m]) for j in range(b) if j != i for m in range(n_loc))
        for l in range(n_loc):
            pos = score[i][i][l]
            total += pos - math.log(math.exp(pos) + neg)
    return -total / (b * n_loc), reg


@pytest.mark.parametrize("scale", [0.3, 30.0])  # 30: raw scores far beyond the clip, exercising tanh_clip
def test_amdim_nce_matches_brute_force(scale):
    g = torch.Generator().manual_seed(0)
    src = scale * torch.randn(4, 6, generator=g, dtype=torch.float64)
    trg = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    loss, reg = amdim_nce(src, trg, clip=5.0, reg_weight=4e-2)
    ref_loss, ref_reg = brute_amdim_nce(src, trg, 5.0, 4e-2)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert reg.item() == pytest.approx(ref_reg, rel=1e-5)


def test_tanh_clip_bounds_and_identity_near_zero():
    x = torch.tensor([-1e6, -1e-3, 0.0, 1e-3, 1e6])
    y = tanh_clip(x, 20.0)
    assert torch.allclose(y, torch.tensor([-20.0, -1e-3, 0.0, 1e-3, 20.0]), atol=1e-6)


def test_amdim_infomax_combines_six_directional_nce_terms():
    g = torch.Generator().manual_seed(1)
    b, d = 3, 5
    g1, g2 = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    l5_1, l5_2 = torch.randn(b, d, 5, 5, generator=g), torch.randn(b, d, 5, 5, generator=g)
    l7_1, l7_2 = torch.randn(b, d, 7, 7, generator=g), torch.randn(b, d, 7, 7, generator=g)
    loc1, loc2 = torch.tensor([0, 7, 24]), torch.tensor([12, 3, 5])
    terms = amdim_infomax(g1, l5_1, l7_1, g2, l5_2, l7_2, loc1, loc2, clip=20.0, reg_weight=4e-2)
    # the 5x5 source at flat location k of image i is feature map [i, :, k // 5, k % 5]
    s5_1 = torch.stack([l5_1[i, :, int(k) // 5, int(k) % 5] for i, k in enumerate(loc1)])
    s5_2 = torch.stack([l5_2[i, :, int(k) // 5, int(k) % 5] for i, k in enumerate(loc2)])
    expect, reg = {}, 0.0
    for name, pairs in {
        "1t5": [(g1, l5_2), (g2, l5_1)],
        "1t7": [(g1, l7_2), (g2, l7_1)],
        "5t5": [(s5_1, l5_2), (s5_2, l5_1)],
    }.items():
        results = [brute_amdim_nce(s.double(), t.double(), 20.0, 4e-2) for s, t in pairs]
        expect[name] = 0.5 * (results[0][0] + results[1][0])
        reg += 0.5 * (results[0][1] + results[1][1])
    for name in ("1t5", "1t7", "5t5"):
        assert terms[name].item() == pytest.approx(expect[name], rel=1e-4)
    assert terms["reg"].item() == pytest.approx(reg, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(sum(expect.values()) + reg, rel=1e-4)


def test_amdim_nce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="src"):
        amdim_nce(torch.randn(4, 6), torch.randn(4, 5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        amdim_nce(torch.randn(1, 6), torch.randn(1, 6, 3))


def brute_nt_xent(z1, z2, t):
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for k in range(n):
        pos = (k + b) % n
        denom = sum(math.exp(float(z[k] @ z[m]) / t) for m in range(n) if m != k)
        total += -math.log(math.exp(float(z[k] @ z[pos]) / t) / denom)
    return total / n


def test_nt_xent_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(brute_nt_xent(z1, z2, 0.5), rel=1e-5)
    assert nt_xent(z1, z2, 0.1).item() == pytest.approx(brute_nt_xent(z1, z2, 0.1), rel=1e-5)


def test_prototypes_and_logits_match_brute_force():
    g = torch.Generator().manual_seed(3)
    n_way, k, d = 4, 3, 6
    labels = torch.tensor([2, 0, 1, 3, 0, 2, 1, 3, 3, 2, 1, 0])  # any order of the support items
    support = torch.randn(n_way * k, d, generator=g, dtype=torch.float64)
    query = torch.randn(7, d, generator=g, dtype=torch.float64)
    protos = prototypes(support, labels, n_way)
    for c in range(n_way):
        members = [support[i] for i in range(len(labels)) if labels[i] == c]
        assert torch.allclose(protos[c], sum(members) / len(members))
    logits = protonet_logits(query, protos, temperature=4.0)
    for q in range(query.shape[0]):
        for c in range(n_way):
            dist = sum((float(query[q, j]) - float(protos[c, j])) ** 2 for j in range(d))
            assert logits[q, c].item() == pytest.approx(-dist / 4.0, rel=1e-10)


def test_prototypes_require_every_class():
    with pytest.raises(ValueError, match="cover exactly"):
        prototypes(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), n_way=3)


def test_confidence_interval_is_196_std_over_sqrt_episodes():
    rng = np.random.default_rng(0)
    accs = rng.uniform(0.3, 0.9, size=600)
    mean, ci = mean_confidence_interval(torch.as_tensor(accs))
    assert mean == pytest.approx(accs.mean(), rel=1e-12)
    assert ci == pytest.approx(1.96 * accs.std() / np.sqrt(600), rel=1e-12)
    # alternating 0/1 accuracies: std is exactly 1/2
    mean, ci = mean_confidence_interval([0.0, 1.0] * 50)
    assert (mean, ci) == (pytest.approx(0.5), pytest.approx(1.96 * 0.5 / 10))
    with pytest.raises(ValueError, match="at least one"):
        mean_confidence_interval([])
