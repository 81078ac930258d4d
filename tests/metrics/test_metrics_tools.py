"""The command-line tools: train_feature_net, fid_stats and evaluate write what they promise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_lab.data.digits import Digits
from diffusion_lab.metrics.feature_net import evaluate_accuracy, load_feature_net
from diffusion_lab.metrics.reference_stats import ReferenceStats

TOOLS = Path(__file__).resolve().parents[2] / "tools"
QUICKSTART = TOOLS.parent / "configs" / "quickstart.yaml"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_feature_net_writes_weights_and_a_truthful_record(tmp_path):
    out = tmp_path / "net.safetensors"
    info = load_tool("train_feature_net").main(
        ["--epochs", "1", "--width", "8", "--feature-dim", "16", "--out", str(out)]
    )
    record = json.loads(out.with_suffix(".json").read_text())
    assert record == info and "--epochs 1" in record["command"]
    model = load_feature_net(out)
    assert model.config()["feature_dim"] == 16
    dm = Digits(val_fraction=0.1, seed=0, batch_size=64)
    dm.setup("fit")
    assert evaluate_accuracy(model, dm.val_dataloader()) == pytest.approx(record["test_accuracy"], abs=1e-9)
    # the same command gives the same weights (the shipped net's "reproduce" promise), whatever the global seed
    torch.manual_seed(123)
    again = tmp_path / "again.safetensors"
    load_tool("train_feature_net").main(
        ["--epochs", "1", "--width", "8", "--feature-dim", "16", "--out", str(again)]
    )
    first, second = load_file(out), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_fid_stats_writes_the_cache_file_the_callback_reads(tmp_path, capsys):
    tool = load_tool("fid_stats")
    path = tool.main(["--split", "val", "--cache-dir", str(tmp_path)])
    assert path.parent == tmp_path and path.name.startswith("digits-val-8px-feature_net-")
    stats = ReferenceStats.load(path)
    dm = Digits(val_fraction=0.1, seed=0)
    dm.setup("fit")
    assert stats.num_samples == len(dm.val_set) and stats.features.shape == (len(dm.val_set), 64)
    before = path.stat().st_mtime_ns
    assert tool.main(["--split", "val", "--cache-dir", str(tmp_path)]) == path
    assert path.stat().st_mtime_ns == before and "exists" in capsys.readouterr().out


def test_evaluate_runs_on_the_quickstart_config(tmp_path):
    """End to end on the lead's DiffusionModule (untrained): a table with measured Heun NFE 2N - 1."""
    config = QUICKSTART
    torch.manual_seed(0)
    md = load_tool("evaluate").main(
        [
            "--config",
            str(config),
            "--steps",
            "1",
            "2",
            "--num-samples",
            "20",
            "--batch-size",
            "10",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "eval"),
            "--device",
            "cpu",
            "--data.init_args.val_fraction=0.2",  # a config override, as on the diffusion-lab command line
        ]
    )
    rows = json.loads((tmp_path / "eval" / "quality_vs_nfe.json").read_text())
    assert [(r["steps"], r["nfe"]) for r in rows] == [(1, 1), (2, 3)]
    assert md.is_file() and (tmp_path / "eval" / "quality_vs_nfe.png").is_file()
    (cached,) = (tmp_path / "cache").iterdir()  # reference statistics of the overridden training split
    dm = Digits(val_fraction=0.2, seed=0)
    dm.setup("fit")
    assert ReferenceStats.load(cached).num_samples == len(dm.train_set)


def test_evaluate_loads_the_checkpoint_weights(tmp_path):
    build = load_tool("evaluate").build_from_config
    model, _ = build(str(QUICKSTART), None, "cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, checkpoint)
    loaded, _ = build(str(QUICKSTART), str(checkpoint), "cpu")
    for (name, expected), (_, got) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, got), name


def test_evaluate_refuses_trainer_overrides():
    with pytest.raises(SystemExit):
        load_tool("evaluate").main(["--config", str(QUICKSTART), "--trainer.devices=8"])
