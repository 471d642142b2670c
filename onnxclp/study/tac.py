"""Trigger-activated change (TAC, CLP paper section 4.2) per channel, beside the channel's score.

    TAC_k = 1/|D| * sum over x in D of || F_k(x) - F_k(delta(x)) ||_2

F_k is channel k of a scored layer's output after its paired BatchNorm/affine and bias, before the activation:
the tensor whose channel CLP zeroes (:attr:`onnxclp.layers.Layer.output`). The norm is over everything but
the batch and channel axes (the H x W feature map of a Conv; a single number for a Gemm). D is the attacked
subset of the data (samples of the target class are left out for all-to-one attacks, as for ASR).

The feature maps come from onnxruntime: the layers' output tensors are added as extra graph outputs of a copy
of the model. TAC needs the trigger, so it is a tool for studying a defence (the paper's Figure 3: TAC against
the score), not a defence.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

PathLike = str | os.PathLike[str]

__all__ = ["LayerTac", "TacResult", "channel_axis", "spearman", "tac"]


@dataclass
class LayerTac:
    """TAC and score of every channel of one scored layer, with the layer's threshold and flagged channels."""

    node: str
    op: str
    output: str
    channels: int
    tac: list[float]
    scores: list[float]
    threshold: float | None
    lower_threshold: float | None
    pruned: list[int]
    role: str = "hidden"

    @property
    def rho(self) -> float | None:
        """Spearman rank correlation of TAC and score over the layer's channels."""
        return spearman(np.asarray(self.tac), np.asarray(self.scores))

    def top(self) -> dict[str, Any]:
        """Where the channel with the largest TAC sits: its score in standard deviations from the layer mean
        (z; the CLP threshold is z = u) and whether it is pruned."""
        t, s = np.asarray(self.tac), np.asarray(self.scores)
        k = int(np.argmax(t))
        sd = float(s.std(ddof=1)) if s.size > 1 else 0.0
        z = (float(s[k]) - float(s.mean())) / sd if sd > 0 else 0.0
        ratio = float(t[k] / np.median(t)) if np.median(t) > 0 else float("inf")
        return {"channel": k, "tac": float(t[k]), "tac_over_median": ratio, "score_z": z, "pruned": k in self.pruned}


@dataclass
class TacResult:
    """TAC of every scored layer of a model on one attack."""

    model: str
    method: str
    params: dict[str, Any]
    attack: dict[str, Any]
    n_images: int
    layers: list[LayerTac] = field(default_factory=list)

    def strongest(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` channels of the whole model whose TAC stands out most from their own layer's (TAC divided
        by the layer's median TAC), with their score's z and whether the method prunes them."""
        rows = []
        for layer in self.layers:
            if layer.role == "output":
                continue
            t, s = np.asarray(layer.tac), np.asarray(layer.scores)
            med = float(np.median(t))
            sd = float(s.std(ddof=1)) if s.size > 1 else 0.0
            for k in range(layer.channels):
                rows.append(
                    {
                        "node": layer.node,
                        "channel": k,
                        "tac": float(t[k]),
                        "tac_over_median": float(t[k] / med) if med > 0 else float("inf"),
                        "score_z": (float(s[k]) - float(s.mean())) / sd if sd > 0 else 0.0,
                        "pruned": k in layer.pruned,
                    }
                )
        rows.sort(key=lambda r: -r["tac_over_median"])
        return rows[:n]

    def summary(self, n: int = 10) -> dict[str, Any]:
        top = self.strongest(n)
        hidden = [layer for layer in self.layers if layer.role != "output"]
        return {
            "layers": len(hidden),
            "layers_top_tac_pruned": sum(1 for layer in hidden if layer.top()["pruned"]),
            "strongest": top,
            "strongest_pruned": sum(1 for r in top if r["pruned"]),
            "median_rho": float(np.median([r for layer in hidden if (r := layer.rho) is not None] or [np.nan])),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for entry, layer in zip(d["layers"], self.layers, strict=True):
            entry["rho"] = layer.rho
            entry["top"] = layer.top()
        d["summary"] = self.summary()
        return d

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2) + "\n"


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 values or a constant."""
    if a.size < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def channel_axis(layer: Any) -> int:
    """The axis of the layer's output tensor that holds its channels (NCHW Conv/Gemm: 1; MatMul X @ W: -1)."""
    if layer.op == "MatMul":
        return -1 if layer.weight_index == 1 else -2
    return 1


def feature_change(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Per sample and channel, the L2 norm of ``a - b`` over every axis but the batch and the channel axes."""
    d = np.moveaxis(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis, 1)
    d = d.reshape(d.shape[0], d.shape[1], -1)
    return np.sqrt((d * d).sum(axis=2))


def report_outputs(graph: onnx.GraphProto, layers: list[Any]) -> dict[str, tuple[str, int]]:
    """The tensor TAC reads, and its channel axis (:func:`channel_axis`), for each layer of a scan's report (by node name): the layer's output after its
    bias and paired affine (:attr:`onnxclp.layers.Layer.output`), found by following the report's ``affine``
    nodes (names, or op types for unnamed nodes) down the layer's output chain; a MatMul's bias Add first."""
    from onnxclp.graph import GraphIndex

    index = GraphIndex(graph)
    by_key = {index.node_key(n): n for n in graph.node}
    out: dict[str, tuple[str, int]] = {}
    for lr in layers:
        node = by_key.get(lr.node)
        if node is None or not node.output:
            continue
        tensor, axis = node.output[0], 1
        if lr.op == "MatMul":
            axis = -1 if index.constant(node.input[1]) is not None else -2
            nxt = index.only_consumer(tensor)
            if nxt is not None and nxt.op_type == "Add" and any(index.constant(x) is not None for x in nxt.input):
                tensor = nxt.output[0]
        for expected in lr.affine.split(", ") if lr.affine else []:
            nxt = index.only_consumer(tensor)
            if nxt is None or expected not in (nxt.name, nxt.op_type):
                break
            tensor = nxt.output[0]
        out[lr.node] = (tensor, axis)
    return out


def tac(
    model: onnx.ModelProto | PathLike,
    prepared: Any,
    method: str = "clp",
    *,
    batch_size: int | None = None,
    name: str | None = None,
    **params: Any,
) -> TacResult:
    """TAC per channel of every scored layer on the attacked subset of ``prepared``
    (:func:`onnxclp.study.measure.prepare` with an attack), with the scores and decisions of ``method``.

    The layers are those of ``onnxclp.scan``'s report; the model runs through the evaluator's
    :class:`~onnxclp.eval.runner.OnnxClassifier` (its device, threads and fixed-batch padding), over sub-batches
    of ``batch_size`` images (default: the prepared batches) so that the feature maps of every layer fit."""
    from onnxclp.api import scan
    from onnxclp.errors import OnnxclpError
    from onnxclp.eval.runner import OnnxClassifier
    from onnxclp.study.measure import load_inline

    if not prepared.has_attack:
        raise OnnxclpError("TAC needs an attack (--attack or --attack-config): it compares triggered and clean")
    if batch_size is not None and batch_size < 1:
        raise OnnxclpError(f"--batch-size must be >= 1, got {batch_size}")
    proto = model if isinstance(model, onnx.ModelProto) else load_inline(model)
    report = scan(proto, method, **{"force": True, **params})  # a study tool: risky u allowed
    outputs = report_outputs(proto.graph, report.layers)
    layers = [(lr, *outputs[lr.node]) for lr in report.layers if lr.node in outputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    for _, tensor, _ in layers:
        if tensor not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
            present.add(tensor)
    runner = OnnxClassifier(probe, device=prepared.device, threads=prepared.threads)
    names = [tensor for _, tensor, _ in layers]
    sums = [np.zeros(lr.channels, np.float64) for lr, _, _ in layers]
    axes = [axis for _, _, axis in layers]
    count = 0
    for clean, mask, trig in zip(prepared.clean, prepared.attacked, prepared.triggered, strict=True):
        x = clean[mask]
        step = batch_size or max(1, len(x))
        for start in range(0, len(x), step):
            a = runner.outputs(x[start : start + step], names)
            b = runner.outputs(trig[start : start + step], names)
            for i, axis in enumerate(axes):
                sums[i] += feature_change(a[i], b[i], axis).sum(axis=0)
            count += len(a[0]) if a else 0
    if count == 0:
        raise OnnxclpError("no attacked sample in the data: TAC is undefined")
    result = TacResult(
        model=name or (str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>"),
        method=method,
        params=report.params,
        attack=prepared.attack,
        n_images=count,
    )
    for (lr, tensor, _), total in zip(layers, sums, strict=True):
        result.layers.append(
            LayerTac(
                node=lr.node,
                op=lr.op,
                output=tensor,
                channels=lr.channels,
                tac=[float(v) for v in total / count],
                scores=list(lr.scores),
                threshold=lr.threshold,
                lower_threshold=lr.lower_threshold,
                pruned=list(lr.pruned),
                role=lr.role,
            )
        )
    return result
