"""The glyph configs run the paper's pipeline through the CLI: AMDIM pretraining exports the encoder, ProtoNet
loads exactly those weights, fine-tunes on episodes and tests with the 95% interval (shrunk data and network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_lab.cli import main
from diffusion_lab.methods.fewshot import load_network_weights
from diffusion_lab.nets.encoders import AmdimEncoder

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "fewshot"
TINY = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.network.init_args.ndf=4",
    "--model.init_args.network.init_args.n_rkhs=16",
    "--data.init_args.source.init_args.n_train_classes=8",
    "--data.init_args.source.init_args.n_val_classes=5",
    "--data.init_args.source.init_args.n_test_classes=6",
    "--data.init_args.source.init_args.instances_per_class=8",
    "--data.init_args.eval_shots=[1, 2]",
    "--data.init_args.eval_query=3",
    "--data.init_args.val_episodes=2",
    "--data.init_args.test_episodes=5",
]


@pytest.mark.slow
def test_glyph_configs_pretrain_then_protonet_then_test(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ssl = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "glyphs_amdim.yaml"),
            *TINY,
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--data.init_args.batch_size=16",
        ]
    )
    exported = tmp_path / "runs" / "fewshot_glyphs" / "amdim.safetensors"
    assert ssl.trainer.global_step == 3 and exported.is_file()
    assert set(ssl.model.results["val"]) == {"5way1shot", "5way2shot"}  # frozen-feature validation ran

    common = [
        "--config",
        str(CONFIGS / "glyphs_protonet.yaml"),
        *TINY,
        f"--model.init_args.pretrained={exported}",
        "--data.init_args.train_query=3",
        "--data.init_args.train_episodes=2",
    ]
    proto = main(["fit", *common, "--trainer.max_epochs=0"])  # setup only: weights loaded, no update
    reference = AmdimEncoder(1, 32, ndf=4, n_rkhs=16, depth=1, use_bn=True)
    load_network_weights(reference, exported)
    for key, value in reference.state_dict().items():
        assert torch.equal(proto.model.network.state_dict()[key], value), key

    proto = main(["fit", *common, "--trainer.max_epochs=1"])
    assert proto.trainer.global_step == 2
    tested = main(["test", *common])
    metrics = tested.trainer.callback_metrics
    for key in ("5way1shot", "5way2shot"):
        mean, ci, episodes = tested.model.results["test"][key]
        assert episodes == 5 and 0.0 <= mean <= 1.0
        assert float(metrics[f"test/acc_{key}"]) == pytest.approx(mean)
        assert float(metrics[f"test/ci95_{key}"]) == pytest.approx(ci)
