"""CLIP (open_clip) from a local file: unit embeddings with CLIP's normalisation, offline BPE tokenizer."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusion_lab.pretrained import load
from diffusion_lab.pretrained.safe_load import MissingWeightsError

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG, quick_gelu=True)
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_image_and_text_embeddings_are_unit_norm_with_clip_normalisation(weights, no_network):
    clip = load("clip/ViT-B-32", weights, model_cfg=TINY_CFG)
    images = torch.rand(3, 3, 48, 48) * 2 - 1
    emb = clip.encode_image(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # independent path: bicubic resize to 32, [-1, 1] -> [0, 1], OpenAI mean / std, normalise the output
    pre = ((F.interpolate(images, size=(32, 32), mode="bicubic") + 1) / 2 - OPENAI_MEAN) / OPENAI_STD
    torch.testing.assert_close(emb, F.normalize(clip.model.encode_image(pre), dim=-1))

    text = clip.encode_text(["a photo of a cat", "a painting of a dog"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(text[0], text[1])
    (grad,) = torch.autograd.grad(clip.encode_image(images.requires_grad_()).sum(), images)
    assert grad.abs().sum() > 0  # differentiable for CLIP guidance


def test_bundled_bpe_tokenizer_works_offline(weights, no_network):
    clip = load("clip/ViT-B-32", weights, model_cfg=TINY_CFG)
    tokens = clip.tokenize(["a photo of a cat", "cat"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    sot, eot = 49406, 49407  # CLIP's start / end-of-text ids
    assert tokens[1, :3].tolist() == [sot, tokens[1, 1].item(), eot] and tokens[1, 3:].eq(0).all()
    # "cat" is one BPE token, and it is the last word of the first prompt
    assert tokens[0, 0] == sot and tokens[0, 6] == eot and tokens[0, 5] == tokens[1, 1]


def test_missing_file_and_wrong_architecture(weights, tmp_path):
    with pytest.raises(MissingWeightsError, match="timm/vit_base_patch16_clip_224.openai"):
        load("clip/ViT-B-16", tmp_path / "open_clip_model.safetensors")
    with pytest.raises(ValueError, match="ViT-B-32"):
        load("clip/ViT-B-32", weights, model_cfg={**TINY_CFG, "embed_dim": 8})  # weights of another shape
