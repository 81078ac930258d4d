"""Embedding networks: declared sizes match outputs, AMDIM local features are local, weights round-trip."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.nets.encoders import AmdimEncoder, Conv4, ResNet12, TimmEncoder, embedding_dim


@pytest.mark.parametrize(
    "net, size",
    [
        (Conv4(1, hidden=8), 20),
        (Conv4(3, hidden=8, pool="flatten", resolution=32), 32),
        (ResNet12(3, widths=(4, 6, 8, 10)), 20),
        (AmdimEncoder(3, 64, ndf=4, n_rkhs=12, depth=1), 64),
        (AmdimEncoder(3, 128, ndf=4, n_rkhs=12, depth=1), 128),
    ],
)
def test_out_dim_matches_output(net, size):
    out = net.eval()(torch.randn(2, net_in_channels(net), size, size))
    assert out.shape == (2, embedding_dim(net))


def net_in_channels(net):
    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def test_conv4_flatten_matches_the_paper_size():
    assert Conv4(3, 64, pool="flatten", resolution=84).out_dim == 1600  # 64 x 5 x 5 (Snell et al.)


def test_amdim_local_features_see_only_their_patch():
    """Valid convolutions: the 7x7 map's corner feature has zero gradient w.r.t. the far corner of the image."""
    net = AmdimEncoder(1, 32, ndf=4, n_rkhs=8, depth=1).eval()
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    global_, local5, local7 = net.multiscale(x)
    assert local5.shape == (1, 8, 5, 5) and local7.shape == (1, 8, 7, 7)
    (grad,) = torch.autograd.grad(local7[0, :, 0, 0].sum(), x, retain_graph=True)
    assert grad[0, 0, :6, :6].abs().sum() > 0 and grad[0, 0, 16:, 16:].abs().sum() == 0
    (grad,) = torch.autograd.grad(global_.sum(), x)
    assert grad[0, 0, 16:, 16:].abs().sum() > 0  # the global feature sees the whole image
    assert torch.allclose(net(x), global_)


def test_amdim_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="resolutions"):
        AmdimEncoder(1, 48)
    with pytest.raises(ValueError, match="expects"):
        AmdimEncoder(1, 32, ndf=4, n_rkhs=8, depth=1)(torch.randn(1, 1, 28, 28))


def test_timm_encoder_by_name_and_local_weights(tmp_path):
    from safetensors.torch import save_file

    net = TimmEncoder("resnet10t", in_channels=1)
    assert net.eval()(torch.randn(2, 1, 32, 32)).shape == (2, net.out_dim)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.backbone.state_dict().items()}, str(path))
    other = TimmEncoder("resnet10t", in_channels=1, weights=str(path)).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(other(x), net(x))
    with pytest.raises(ValueError, match="unknown timm model"):
        TimmEncoder("no_such_net")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        TimmEncoder("resnet10t", weights=str(tmp_path / "missing.safetensors"))
