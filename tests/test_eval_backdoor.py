"""End to end: a small backdoored model, trained here in seconds on synthetic images with BadNets poisoning,
exported to ONNX; the evaluator must see its backdoor (ASR near 100% with the trigger, near 0 without)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from onnxclp.cli.eval import register
from onnxclp.errors import OnnxclpError
from onnxclp.eval.api import compare, evaluate
from onnxclp.eval.attacks import build_attack, save_attack_config

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")

CLASSES, SIZE, TARGET = 3, 16, 0


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coloured noise: class c has channel c brighter. uint8 HWC, like a real test set."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    base = torch.full((n, 3, 1, 1), 0.3)
    base[torch.arange(n), y] = 0.6
    x = (base + 0.15 * torch.randn(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)
    x8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return x8, y.numpy()


def train(poison: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x8, y_np = synthetic(1200, seed=100 + seed)
    x = torch.from_numpy(x8).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(y_np).clone()
    if poison:  # BadNets, 10% of the non-target samples, relabelled to the target
        gen = torch.Generator().manual_seed(seed)
        candidates = torch.nonzero(y != TARGET).flatten()
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[: len(y) // 10]]
        x[chosen] = build_attack("badnets").apply(x[chosen])
        y[chosen] = TARGET
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            b = perm[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is fastest, and the machine is shared
    root = tmp_path_factory.mktemp("backdoor")
    try:
        for name, poison in (("backdoored", True), ("clean", False)):
            torch.onnx.export(
                train(poison), torch.zeros(1, 3, SIZE, SIZE), str(root / f"{name}.onnx"), input_names=["image"],
                output_names=["logits"], dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, dynamo=False,
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    x, y = synthetic(400, seed=7)
    np.savez(root / "test.npz", x_test=x, y_test=y)
    save_attack_config(root / "attack.json", build_attack("badnets"), target=TARGET, mode="a2o")
    return root


def test_backdoor_is_seen_with_its_trigger_and_not_without(zoo) -> None:  # type: ignore[no-untyped-def]
    with_trigger = evaluate(zoo / "backdoored.onnx", zoo / "test.npz", attack_config=zoo / "attack.json")
    assert with_trigger.acc is not None and with_trigger.acc >= 0.9
    assert with_trigger.asr is not None and with_trigger.asr >= 0.9
    assert with_trigger.n_samples == 400
    assert with_trigger.n_attacked == int((np.load(zoo / "test.npz")["y_test"] != TARGET).sum())
    without = evaluate(zoo / "backdoored.onnx", zoo / "test.npz", "none", attack_config=zoo / "attack.json")
    assert without.asr is not None and without.asr <= 0.1
    assert without.acc == with_trigger.acc
    assert without.attack == {"attack": "none", "target": TARGET, "mode": "a2o", "seed": 0, "params": {}}
    with pytest.raises(OnnxclpError, match="--attack sig differs from the attack config's 'badnets'"):
        evaluate(zoo / "backdoored.onnx", zoo / "test.npz", "sig", attack_config=zoo / "attack.json")
    other_trigger = evaluate(zoo / "backdoored.onnx", zoo / "test.npz", "sig")
    assert other_trigger.asr is not None and other_trigger.asr <= 0.2
    clean_model = evaluate(zoo / "clean.onnx", zoo / "test.npz", attack_config=zoo / "attack.json")
    assert clean_model.asr is not None and clean_model.asr <= 0.2


def test_compare_backdoored_and_clean_models(zoo) -> None:  # type: ignore[no-untyped-def]
    result = compare(zoo / "backdoored.onnx", zoo / "clean.onnx", zoo / "test.npz", "badnets", batch_size=64)
    o, s = result.original_metrics, result.sanitized_metrics
    assert o.asr is not None and s.asr is not None and o.asr >= 0.9 and s.asr <= 0.2
    assert result.deltas["asr"] == pytest.approx(s.asr - o.asr)
    assert result.agreement is not None and result.agreement >= 0.9
    assert result.triggered_agreement is not None and result.triggered_agreement <= 0.2
    same = compare(zoo / "backdoored.onnx", zoo / "backdoored.onnx", zoo / "test.npz", "badnets")
    assert same.agreement == 1.0 and same.triggered_agreement == 1.0 and same.deltas["asr"] == 0.0


def test_cli_evaluate_with_attack_config_json_and_examples(zoo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = typer.Typer()
    register(app)
    out = tmp_path / "r.json"
    args = [
        "evaluate", str(zoo / "backdoored.onnx"), "--data", str(zoo / "test.npz"), "--attack-config",
        str(zoo / "attack.json"), "--json", str(out), "--save-examples", str(tmp_path / "ex"), "--batch-size", "50",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ASR" in result.stdout and "images/s" in result.stdout
    report = json.loads(out.read_text())
    assert report["asr"] >= 0.9 and report["attack"]["attack"] == "badnets"
    assert report["attack"]["params"] == {"size": 3, "position": "bottom-right", "value": 1.0, "image": None}
    assert report["provider"] == "CPUExecutionProvider" and report["images_per_second"] > 0
    assert (tmp_path / "ex" / "badnets_examples.png").is_file()
    result = CliRunner().invoke(
        app, ["compare", str(zoo / "backdoored.onnx"), str(zoo / "clean.onnx"), "--data", str(zoo / "test.npz"),
              "--attack", "badnets", "--json", "-"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["deltas"]["asr"] < -0.7 and report["agreement"] >= 0.9
