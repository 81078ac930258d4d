"""DINO ViT from a local file: per-block keys, queries, values and [CLS] against a hand-written forward."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusion_lab.pretrained import load
from diffusion_lab.pretrained.safe_load import MissingWeightsError

ARCH = "vit_small_patch8_224.dino"
TINY = dict(img_size=32, embed_dim=48, depth=3, num_heads=2)  # 16 patches + [CLS], 24 channels per head


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY)
    folder = tmp_path_factory.mktemp("dino")
    save_file(vit.state_dict(), str(folder / "model.safetensors"))
    # the official release's training checkpoint layout: teacher.backbone.* plus a projection head
    release = {"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}
    release["teacher"]["head.mlp.0.weight"] = torch.zeros(4, 48)
    torch.save(release, folder / "dino_full_checkpoint.pth")
    return folder


def manual_tokens(vit, images: torch.Tensor) -> list[torch.Tensor]:
    """[CLS] + patch tokens through each block, written out: the reference for the hooks."""
    x = vit.patch_embed(images)  # (B, N, D)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
    outs = []
    for block in vit.blocks:
        outs.append(x)  # input of this block
        x = block(x)
    return outs + [x]


def test_keys_queries_values_and_cls_of_requested_blocks_match_a_manual_forward(weights, no_network):
    dino = load(f"dino/{ARCH}", weights / "model.safetensors", **TINY)
    vit = dino.vit
    images = torch.rand(2, 3, 40, 40) * 2 - 1  # [-1, 1], resized to 32 inside
    feats = dino(images, blocks=(0, -1))
    assert set(feats.keys) == {0, -1}

    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    pre = (F.interpolate(images, size=(32, 32), mode="bilinear") + 1) / 2
    inputs = manual_tokens(vit, (pre - mean) / std)
    d = 48
    for requested, index in ((0, 0), (-1, 2)):
        qkv = vit.blocks[index].attn.qkv(vit.blocks[index].norm1(inputs[index]))  # (B, 17, 3 D)
        torch.testing.assert_close(feats.keys[requested], qkv[..., d : 2 * d])
        torch.testing.assert_close(feats.queries[requested], qkv[..., :d])
        torch.testing.assert_close(feats.values[requested], qkv[..., 2 * d :])
        torch.testing.assert_close(feats.tokens[requested], inputs[index + 1])
        assert feats.keys[requested].shape == (2, 1 + 16, d)
        torch.testing.assert_close(feats.cls(requested), inputs[index + 1][:, 0])
    # [CLS] is taken before the final LayerNorm: normalising it gives forward_features' token 0
    with torch.no_grad():
        final = vit.forward_features((pre - mean) / std)
    torch.testing.assert_close(vit.norm(feats.tokens[-1]), final)


def test_keys_are_all_heads_concatenated_head_major(weights):
    """Rebuilding multi-head attention from the returned q, k, v (heads = consecutive 24-channel slices)
    reproduces the block's attention output."""
    dino = load(f"dino/{ARCH}", weights / "model.safetensors", **TINY)
    block = dino.vit.blocks[1]
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = dino(images, blocks=(0, 1))
    x = feats.tokens[0]  # input of block 1
    q, k, v = (
        t.unflatten(-1, (2, 24)).transpose(1, 2) for t in (feats.queries[1], feats.keys[1], feats.values[1])
    )
    weights_ = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(24), dim=-1)
    attn = block.attn.proj((weights_ @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn, block.attn(block.norm1(x)), rtol=1e-5, atol=1e-5)


def test_later_blocks_are_not_computed(weights):
    dino = load(f"dino/{ARCH}", weights / "model.safetensors", **TINY)
    calls = []
    dino.vit.blocks[2].register_forward_hook(lambda *_: calls.append(1))
    dino(torch.zeros(1, 3, 32, 32), blocks=(1,))
    assert calls == []
    with pytest.raises(ValueError, match="out of range"):
        dino(torch.zeros(1, 3, 32, 32), blocks=(3,))


def test_official_release_layout_loads_to_the_same_weights(weights):
    a = load(f"dino/{ARCH}", weights / "model.safetensors", **TINY)
    b = load(f"dino/{ARCH}", weights / "dino_full_checkpoint.pth", **TINY)
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(a(images).keys[-1], b(images).keys[-1], rtol=0, atol=0)


def test_missing_and_mismatched_weights(weights, tmp_path):
    with pytest.raises(MissingWeightsError, match="dino_vitbase8_pretrain.pth"):
        load("dino/vit_base_patch8_224.dino", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="vit_small_patch8_224.dino"):
        load(f"dino/{ARCH}", weights / "model.safetensors", img_size=32, embed_dim=48, depth=2, num_heads=2)
