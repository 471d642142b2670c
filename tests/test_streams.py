"""Residual streams (onnxclp.passes.streams): which scored layers are summed channel for channel, and the
report's note when one channel is pruned in several of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import ModelProto, helper

import onnxclp
from onnxclp.graph import GraphIndex
from onnxclp.io import TensorStore
from onnxclp.layers import find_layers
from onnxclp.passes.streams import Stream, coupled_prunes, residual_streams
from tests.builders import init, model

C = 16


def _weights(seed: int, cin: int, planted: int | None) -> np.ndarray:
    w = np.random.default_rng(seed).normal(0, 0.1, (C, cin, 3, 3))
    if planted is not None:
        w[planted] *= 40.0  # a channel far above its layer's mean + 3 std
    return w


def block(merge: str = "Add", plant_stem: int | None = 5, plant_c2: int | None = 5, se: bool = False) -> ModelProto:
    """stem -> relu -> [c1 -> relu -> c2 (-> * gate)] (+) relu(stem) -> relu -> head (a 4-channel output conv).

    ``merge``: "Add", "Sum", "Sub" or "Concat" (Concat is not a sum: no stream).
    """
    inits = [
        init("Ws", _weights(0, 3, plant_stem)),
        init("W1", _weights(1, C, None)),
        init("W2", _weights(2, C, plant_c2)),
        init("Wh", np.random.default_rng(3).normal(0, 0.1, (4, 2 * C if merge == "Concat" else C, 1, 1))),
        init("half", np.full((1, C, 1, 1), 0.5)),
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "Ws"], ["s"], name="stem", pads=pads),
        helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
        helper.make_node("Conv", ["sr", "W1"], ["a"], name="c1", pads=pads),
        helper.make_node("Relu", ["a"], ["ar"], name="c1_relu"),
        helper.make_node("Conv", ["ar", "W2"], ["b"], name="c2", pads=pads),
    ]
    branch = "b"
    if se:  # a squeeze-and-excitation-like gate: a product of two computed tensors ends the stream
        nodes += [
            helper.make_node("GlobalAveragePool", ["b"], ["g"], name="gap"),
            helper.make_node("Sigmoid", ["g"], ["gs"], name="gate"),
            helper.make_node("Mul", ["b", "gs"], ["bg"], name="scale"),
        ]
        branch = "bg"
    # a per-channel constant on the shortcut keeps channel k in channel k
    nodes.append(helper.make_node("Mul", ["sr", "half"], ["sh"], name="shortcut_scale"))
    if merge == "Concat":
        nodes.append(helper.make_node("Concat", [branch, "sh"], ["m"], name="merge", axis=1))
    else:
        nodes.append(helper.make_node(merge, [branch, "sh"], ["m"], name="merge"))
    nodes += [
        helper.make_node("Relu", ["m"], ["mr"], name="merge_relu"),
        helper.make_node("Conv", ["mr", "Wh"], ["y"], name="head"),
    ]
    return model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def streams_of(m) -> list[Stream]:
    store = TensorStore(m, Path("."))
    index = GraphIndex(m.graph)
    return residual_streams(index, find_layers(index, store).layers)


@pytest.mark.parametrize("merge", ["Add", "Sum", "Sub"])
def test_a_sum_of_two_computed_tensors_joins_their_layers(merge: str) -> None:
    assert streams_of(block(merge)) == [Stream(("stem", "c2"), ("merge",))]


@pytest.mark.parametrize("kind", ["concat", "se"])
def test_concat_and_gated_products_end_the_stream(kind: str) -> None:
    m = block("Concat") if kind == "concat" else block(se=True)
    assert streams_of(m) == []


def test_coupled_prunes_is_per_channel_and_per_stream() -> None:
    streams = [Stream(("a", "b", "c"), ("add1",)), Stream(("d", "e"), ("add2",))]
    pruned = {"a": [1, 2], "b": [2], "c": [2, 7], "d": [1], "e": [3]}
    out = coupled_prunes(streams, pruned)
    assert [(c.channel, c.layers, c.merge) for c in out] == [(2, ("a", "b", "c"), "add1")]
    assert coupled_prunes(streams, {}) == []


def test_the_report_notes_a_channel_pruned_on_both_sides_of_a_sum() -> None:
    m = block()
    report = onnxclp.scan(m, "clp", streams="all")
    assert {layer.node: layer.pruned for layer in report.layers if layer.pruned} == {"stem": [5], "c2": [5]}
    assert [(c.channel, c.layers, c.merge) for c in report.coupled] == [(5, ["stem", "c2"], "merge")]
    assert json.loads(report.to_json())["coupled"] == [
        {"channel": 5, "layers": ["stem", "c2"], "merge": "merge", "kept": None}
    ]
    # different channels in the two layers: no shared channel of the stream, no note
    assert onnxclp.scan(block(plant_c2=9), "clp").coupled == []
    # --streams all: the note is a report, not an edit: sanitize prunes what CLP selects in each layer
    _, rep = onnxclp.sanitize(m, "clp", streams="all")
    assert rep.pruned_channels == 2 and len(rep.coupled) == 1


def test_stream_rule_strongest_prunes_the_stream_channel_once() -> None:
    """The default rule: channel 5 of the stream is one decision, taken in the layer where it is most outlying."""
    m = block()
    full = onnxclp.scan(m, "clp", streams="all")
    z = {layer.node: (layer.scores[5] - layer.score_mean) / layer.score_std for layer in full.layers if layer.pruned}
    strongest = max(z, key=z.get)
    _, rep = onnxclp.sanitize(m, "clp")
    assert {layer.node: layer.pruned for layer in rep.layers if layer.pruned} == {strongest: [5]}
    assert rep.pruned_channels == 1 and rep.coupled[0].kept == strongest
    other = next(layer for layer in rep.layers if layer.node in z and layer.node != strongest)
    assert "stream rule 'strongest'" in other.note


def test_the_note_is_printed(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from onnxclp.cli import app

    path = tmp_path / "m.onnx"
    path.write_bytes(block().SerializeToString())
    result = CliRunner().invoke(app, ["scan", str(path), "--streams", "all"])
    assert result.exit_code == 0, result.stdout
    assert "channel 5 is pruned in 2 layers that write the same residual stream" in " ".join(result.stdout.split())
    result = CliRunner().invoke(app, ["scan", str(path)])
    assert "channel 5 was flagged in 2 layers that write the same residual stream" in " ".join(result.stdout.split())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_streams_of_an_exported_resnet(tmp_path: Path, dynamo: bool) -> None:
    """A ResNet from either torch exporter: the stem with the first block's identity shortcut, then each
    downsampling block's second conv with its projection shortcut."""
    import onnx

    from tests.test_torch_parity import _export
    from tests.torch_models import SmallResNet

    path = tmp_path / "resnet.onnx"
    _export(SmallResNet(width=8).eval(), path, dynamo)
    streams = streams_of(onnx.load(str(path)))
    assert sorted(len(s.layers) for s in streams) == [2, 2, 2], streams
    assert all(len(s.merges) == 1 for s in streams), streams
