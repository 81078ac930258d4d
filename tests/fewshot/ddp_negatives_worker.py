"""Worker of tests/fewshot/test_ddp_negatives.py (run as a script, not collected by pytest).

``python ddp_negatives_worker.py OUT ref`` computes the AMDIM and SimCLR losses and parameter gradients of a
tiny float64 network on the whole batch in one process. ``python ddp_negatives_worker.py OUT RANK INIT_FILE
B0,B1 ...`` is one of two gloo ranks; for each split ``B0,B1`` it holds rows ``sum(B[:RANK]) ..`` of the
same batch, the network wrapped in DistributedDataParallel, with negatives gathered across ranks
(``gather=True``) and, for contrast, local only (``gather=False``). Results go to OUT as a ``torch.save``
dict of float64 tensors.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from diffusion_lab.methods.fewshot_losses import amdim_infomax, nt_xent

BATCH = 8  # images of the global batch
torch.set_default_dtype(torch.float64)


class ToyMultiscale(nn.Module):
    """A 1x1-conv "encoder" with AMDIM's outputs: global (B, D), 5x5 and 7x7 maps (B, D, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        local7 = torch.tanh(self.conv(x))
        return self.head(local7.mean(dim=(2, 3))), local7[..., 1:6, 1:6], local7


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x1": torch.randn(BATCH, 3, 7, 7, generator=g),
        "x2": torch.randn(BATCH, 3, 7, 7, generator=g),
        "locations": torch.randint(0, 25, (2, BATCH), generator=g),
        "a1": torch.randn(BATCH, 5, generator=g),
        "a2": torch.randn(BATCH, 5, generator=g),
    }


def networks() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    # scale up the conv so the scores are large enough for the tanh clip (clip 2 below) to matter
    amdim = ToyMultiscale()
    with torch.no_grad():
        amdim.conv.weight.mul_(3.0)
    return amdim, nn.Linear(5, 4)


def run(rows: slice, gather: bool, wrap=lambda m: m) -> dict[str, torch.Tensor]:
    """Loss terms and parameter gradients for the images ``rows`` of the batch."""
    data = batch()
    amdim, simclr = (wrap(net) for net in networks())
    out: dict[str, torch.Tensor] = {}
    b = data["x1"][rows].shape[0]
    features = amdim(torch.cat([data["x1"][rows], data["x2"][rows]]))
    (g1, g2), (l5_1, l5_2), (l7_1, l7_2) = (f.split(b) for f in features)
    loc = data["locations"][:, rows]
    terms = amdim_infomax(g1, l5_1, l7_1, g2, l5_2, l7_2, loc[0], loc[1], clip=2.0, gather=gather)
    terms["loss"].backward()
    out.update({f"amdim/{k}": v.detach() for k, v in terms.items()})
    out.update({f"amdim_grad/{k}": p.grad.clone() for k, p in amdim.named_parameters()})
    z = simclr(torch.cat([data["a1"][rows], data["a2"][rows]]))
    loss = nt_xent(z[:b], z[b:], temperature=0.5, gather=gather)
    loss.backward()
    out["simclr/loss"] = loss.detach()
    out.update({f"simclr_grad/{k}": p.grad.clone() for k, p in simclr.named_parameters()})
    return {k.replace("module.", ""): v for k, v in out.items()}


def main() -> None:
    out = sys.argv[1]
    if sys.argv[2] == "ref":
        torch.save(run(slice(0, BATCH), gather=True), out)  # no process group: gather is a no-op
        return
    rank, init_file = int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    wrap = nn.parallel.DistributedDataParallel
    results = {}
    for split in sys.argv[4:]:  # shard sizes "B0,B1"
        sizes = [int(s) for s in split.split(",")]
        assert sum(sizes) == BATCH and len(sizes) == 2
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        results.update({f"{split}/gathered/{k}": v for k, v in run(rows, gather=True, wrap=wrap).items()})
        results.update({f"{split}/local/{k}": v for k, v in run(rows, gather=False, wrap=wrap).items()})
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
