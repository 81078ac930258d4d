"""EMA update rule and LR schedules against their formulas."""

from __future__ import annotations

import math

import torch

from diffusion_lab.methods.ema import EMA
from diffusion_lab.methods.lr_schedules import WarmupCosine, warmup_cosine_factor


def test_ema_matches_recursive_formula():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9, warmup=True)
    expected = [p.detach().clone() for p in model.parameters()]
    for k in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        beta = min(0.9, (1 + k) / (10 + k))
        expected = [beta * e + (1 - beta) * p.detach() for e, p in zip(expected, model.parameters())]
        ema.update(model)
    for e, p in zip(expected, ema.averaged.parameters()):
        torch.testing.assert_close(p, e)
    assert int(ema.num_updates) == 30


def test_ema_state_round_trips():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    ema.update(model)
    other = EMA(torch.nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 1
    for a, b in zip(ema.averaged.parameters(), other.averaged.parameters()):
        assert torch.equal(a, b)


def test_warmup_cosine_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, warmup_steps=10, total_steps=110, final_lr_fraction=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 0.1) and math.isclose(lrs[9], 1.0)
    mid = 10 + 50  # half way through the cosine: 0.1 + 0.9 * 0.5
    assert math.isclose(lrs[mid], 0.55, rel_tol=1e-9)
    assert math.isclose(lrs[115], 0.1) and math.isclose(warmup_cosine_factor(110, 10, 110, 0.1), 0.1)
