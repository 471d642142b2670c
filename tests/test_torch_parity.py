"""Parity with a reference CLP in torch (docs/algorithms.md, "CLP") on models exported by both exporters.

For each model the reference runs on the torch model with its BatchNorms unfused; onnxclp runs on the ONNX
export (BatchNorm folded by the exporter where it directly follows a Conv). Both must flag the same channels,
and the sanitized ONNX must reproduce the reference-pruned torch model's logits in onnxruntime.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch_models import VGGBN, PreActResNet, SmallResNet, conv_bn_pairs, folded_weight, randomize_bn, reference_clp

import onnxclp

torch.set_num_threads(2)
MODELS = {"resnet": SmallResNet, "vgg_bn": VGGBN, "preact_resnet": PreActResNet}


def _export(m: torch.nn.Module, path, dynamo: bool) -> None:
    x = torch.randn(2, 3, 16, 16)
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else {"dynamic_axes": {"x": {0: "n"}}}
    torch.onnx.export(m, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"], **kwargs)


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def dynamo(request):
    return request.param


@pytest.mark.parametrize("name", list(MODELS))
def test_clp_parity_with_reference(name, dynamo, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name](width=16).eval()
    randomize_bn(model, seed=1, outliers=1)
    path = tmp_path / f"{name}.onnx"
    _export(model, path, dynamo)

    every_conv_has_bn = name != "preact_resnet"
    ref_model = copy.deepcopy(model)
    flagged = reference_clp(ref_model, u=3.0, unpaired=not every_conv_has_bn)
    # The public code's scale has no eps; here it changes no decision (docs/algorithms.md, "CLP").
    no_eps = reference_clp(copy.deepcopy(model), eps=False)
    assert list(no_eps.values()) == list(reference_clp(copy.deepcopy(model)).values())

    out_path = tmp_path / "sanitized.onnx"
    report = onnxclp.sanitize_file(path, out_path, method="clp", u=3.0)
    assert sum(len(v) for v in flagged.values()) > 0, "the planted outliers must be found"

    # Map each ONNX layer to its torch Conv by the (folded) weight values.
    bn_of = {id(c): b for c, b in conv_bn_pairs(model)}
    convs = [(c, folded_weight(c, bn_of.get(id(c))).numpy()) for c in model.modules() if isinstance(c, torch.nn.Conv2d)]
    ref_by_index = {
        i: flagged[rc] for i, rc in enumerate(c for c in ref_model.modules() if isinstance(c, torch.nn.Conv2d))
    }
    original = onnx.load(str(path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    conv_layers = [layer for layer in report.layers if layer.op == "Conv"]
    assert len(conv_layers) == len(convs)
    for layer in conv_layers:
        w = weights[layer.weight]
        matches = [
            i for i, (_, cw) in enumerate(convs) if cw.shape == w.shape and np.allclose(cw, w, rtol=1e-4, atol=1e-6)
        ]
        assert len(matches) == 1, f"{layer.node}: cannot map to a torch Conv"
        assert layer.pruned == ref_by_index[matches[0]], layer.node

    # The sanitized ONNX reproduces the reference-pruned torch logits.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = ref_model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.max(np.abs(got - expected)) <= 1e-4
    onnx.checker.check_model(str(out_path), full_check=True)
