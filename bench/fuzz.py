"""Fuzzing of onnxclp's loader and pattern matcher, for a bounded time (not run in CI).

Two fuzzers, each starting from a corpus of small valid models generated here (Conv/BN chains, grouped and
depthwise Conv, ConvTranspose, Gemm, MatMul + Add, tf2onnx-style Mul + Add, weights behind Transpose and
DequantizeLinear, an If subgraph, a model with external data, a model-local function called twice):

- ``bytes``: libFuzzer (atheris), coverage-guided over onnxclp's code, mutates the serialized model file.
- ``graph``: structure-aware. A model is parsed and changed by 1 to 4 random edits that keep it a valid
  protobuf but break it as a graph: op types, inputs, outputs, attribute types and values, dims, data types,
  tensor data (NaN, Inf, huge, truncated), external-data entries (``../``, absolute, offsets), subgraphs,
  node order, graph inputs and outputs, opset. With atheris these edits are libFuzzer's custom mutator (still
  coverage-guided); without it (``--no-atheris``) a seeded random loop applies them.

Each input is written as ``model.onnx`` into a scratch folder that also holds a valid external-data file, and
goes through ``load_model`` -> ``scan`` (method, score chosen from the input's hash) -> ``sanitize_file``
(``fuse_bn`` and ``inline_functions`` too) -> the output is loaded back with onnxclp's own loader. The expected outcome for a broken
input is :class:`~onnxclp.errors.OnnxclpError`. A *crash* is anything else: another exception, a warning
(it would reach stderr), a MemoryError under a 4 GiB address-space limit, an input > 20 s, an output that onnxclp's loader refuses, a change to the input
folder, or a file opened outside the scratch folder's ``in/`` and ``out/`` (an audit hook watches every
``open``; a bait file sits next to ``in/``). Crashes are counted once per (kind, exception, innermost onnxclp
frame) and their inputs saved under ``bench/_work/fuzz/crashes/``.

Run: ``python bench/fuzz.py --seconds 120 [--mode bytes|graph|both] [--no-atheris]``. Prints, per mode, the
number of inputs tried, inputs per second, the outcomes, and the unique crashes. Needs ``pip install
atheris`` for the coverage-guided runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WORK = Path(__file__).resolve().parent / "_work" / "fuzz"
PER_INPUT_S = 20
MEMORY_LIMIT = 4 * 2**30  # address space of the fuzzing process
W_BIN = np.random.default_rng(1).standard_normal(4096).astype("<f4").tobytes()  # 16 KiB of weights

# ---------------------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------------------


def _t(rng: np.random.Generator, name: str, *shape: int, low: float | None = None) -> TensorProto:
    a = rng.uniform(low, 1.5, shape) if low is not None else rng.standard_normal(shape)
    return numpy_helper.from_array(a.astype(np.float32), name)


def _model(nodes, inits, x_shape, y="y", opset=17, extra_outputs=()) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "seed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in (y, *extra_outputs)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _bn(rng, prefix: str, k: int) -> list[TensorProto]:
    return [
        _t(rng, f"{prefix}.g", k, low=0.5),
        _t(rng, f"{prefix}.b", k),
        _t(rng, f"{prefix}.m", k),
        _t(rng, f"{prefix}.v", k, low=0.5),
    ]


def seeds() -> list[onnx.ModelProto]:
    """Small valid models covering the patterns onnxclp matches."""
    rng = np.random.default_rng(0)
    out = []
    # Conv -> BN -> Relu -> grouped Conv -> BN -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    inits = [_t(rng, "W1", 12, 3, 3, 3), _t(rng, "B1", 12), *_bn(rng, "bn1", 12), _t(rng, "W2", 12, 4, 3, 3)]
    inits += [*_bn(rng, "bn2", 12), _t(rng, "Wfc", 5, 12), _t(rng, "Bfc", 5)]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.g", "bn1.b", "bn1.m", "bn1.v"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=3, strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", "bn2.g", "bn2.b", "bn2.m", "bn2.v"], ["b2"], name="bn2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "Wfc", "Bfc"], ["y"], name="fc", transB=1),
    ]
    out.append(_model(nodes, inits, [1, 3, 8, 8]))
    # Depthwise Conv + ConvTranspose + MatMul + Add
    inits = [_t(rng, "Wd", 6, 1, 3, 3), _t(rng, "Wt", 6, 4, 2, 2), _t(rng, "Wm", 8, 3), _t(rng, "Bm", 3)]
    nodes = [
        helper.make_node("Conv", ["x", "Wd"], ["d"], name="dw", group=6, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("ConvTranspose", ["dr", "Wt"], ["t"], name="up", strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["tr"]),
        helper.make_node("MatMul", ["tr", "Wm"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "Bm"], ["y"], name="mm_bias"),
    ]
    out.append(_model(nodes, inits, [1, 6, 4, 4]))
    # tf2onnx style: Conv -> Mul -> Add (per-channel), weights behind Transpose; a DequantizeLinear weight
    w_hwio = rng.standard_normal((3, 3, 3, 12)).astype(np.float32)
    q = rng.integers(-100, 100, (12, 12, 1, 1)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w_hwio, "W_hwio"),
        numpy_helper.from_array(np.array([3, 2, 0, 1], np.int64), "perm_unused"),
        _t(rng, "mul", 1, 12, 1, 1),
        _t(rng, "add", 1, 12, 1, 1),
        numpy_helper.from_array(q, "Wq"),
        numpy_helper.from_array(np.float32(0.02), "scale"),
        numpy_helper.from_array(np.int8(0), "zp"),
    ]
    nodes = [
        helper.make_node("Transpose", ["W_hwio"], ["W_oihw"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "W_oihw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "mul"], ["cm"], name="mul"),
        helper.make_node("Add", ["cm", "add"], ["ca"], name="add"),
        helper.make_node("Relu", ["ca"], ["r"]),
        helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["Wdq"]),
        helper.make_node("Conv", ["r", "Wdq"], ["y"], name="conv_q"),
    ]
    out.append(_model(nodes, inits, [1, 3, 6, 6]))
    # An If whose branches hold a Conv with its own weight; the main graph has a Conv too
    branch_w = _t(rng, "Wb", 4, 4, 1, 1)
    branch = helper.make_graph(
        [helper.make_node("Conv", ["h", "Wb"], ["bo"], name="branch_conv")],
        "branch",
        [],
        [helper.make_tensor_value_info("bo", TensorProto.FLOAT, None)],
        [branch_w],
    )
    inits = [_t(rng, "Wh", 4, 2, 1, 1), numpy_helper.from_array(np.array(True), "cond")]
    nodes = [
        helper.make_node("Conv", ["x", "Wh"], ["h"], name="conv_h"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch),
    ]
    out.append(_model(nodes, inits, [1, 2, 3, 3]))
    # External data: W1 and the Gemm weight live in w.bin beside the model
    m = onnx.ModelProto()
    m.CopyFrom(out[0])
    offset = 0
    for t in m.graph.initializer:
        if t.name in ("W1", "Wfc"):
            n = int(np.prod(t.dims)) * 4
            t.ClearField("raw_data")
            for key, value in (("location", "w.bin"), ("offset", str(offset)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = key, value
            t.data_location = TensorProto.EXTERNAL
            offset += n
    out.append(m)
    # a model-local function (Conv -> BN -> Relu) called twice with different weights, as torch's
    # export_modules_as_functions writes blocks; exercised with --inline-functions
    body = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    fn = helper.make_function(
        "local", "blk", ["x", "w", "g", "b", "m", "v"], ["y"], body, [helper.make_opsetid("", 17)]
    )
    inits = [_t(rng, "Wa", 12, 3, 3, 3), *_bn(rng, "bna", 12), _t(rng, "Wb", 12, 12, 3, 3), *_bn(rng, "bnb", 12)]
    nodes = [
        helper.make_node("blk", ["x", "Wa", "bna.g", "bna.b", "bna.m", "bna.v"], ["h1"], domain="local", name="b1"),
        helper.make_node("blk", ["h1", "Wb", "bnb.g", "bnb.b", "bnb.m", "bnb.v"], ["y"], domain="local", name="b2"),
    ]
    m = _model(nodes, inits, [1, 3, 8, 8])
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(fn)
    out.append(m)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Structure-aware mutations
# ---------------------------------------------------------------------------------------------------------------

OPS = [
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Mul", "Add", "Identity", "Relu",
    "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "DequantizeLinear", "Constant", "Flatten", "If",
]  # fmt: skip
ATTRS = [
    "group", "strides", "dilations", "pads", "kernel_shape", "epsilon", "alpha", "beta", "transA", "transB",
    "perm", "to", "axis", "axes", "training_mode", "value", "auto_pad", "then_branch",
]  # fmt: skip
LOCATIONS = [
    "w.bin", "../bait/secret.bin", "..\\bait\\secret.bin", "/etc/passwd", "sub/../../bait/secret.bin",
    "w.bin\x00", "C:w.bin", "", ".", "model.onnx", "out.onnx.data", "/proc/self/mem", "./w.bin",
]  # fmt: skip
FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 1e38, 3.4e38, float("nan"), float("inf"), float("-inf"), 1e-30]
INTS = [0, 1, -1, 2, 3, 7, 64, 2**31 - 1, 2**31, -(2**31), 2**62, 2**63 - 1, -(2**63)]


def _names(m: onnx.ModelProto) -> list[str]:
    g = m.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    for n in g.node:
        names.extend(n.output)
    return [x for x in names if x] or ["x"]


def _random_attribute(r: random.Random, name: str) -> onnx.AttributeProto:
    kind = r.choice(["int", "ints", "float", "floats", "string", "tensor", "graph"])
    if kind == "int":
        return helper.make_attribute(name, r.choice(INTS))
    if kind == "ints":
        return helper.make_attribute(name, [r.choice(INTS) for _ in range(r.randint(0, 6))])
    if kind == "float":
        return helper.make_attribute(name, r.choice(FLOATS))
    if kind == "floats":
        return helper.make_attribute(name, [r.choice(FLOATS) for _ in range(r.randint(1, 4))])
    if kind == "string":
        return helper.make_attribute(name, r.choice([b"", b"SAME_UPPER", b"\xff\xfe", b"[/bold]"]))
    if kind == "tensor":
        return helper.make_attribute(name, numpy_helper.from_array(np.zeros(r.randint(0, 4), np.float32)))
    return helper.make_attribute(name, helper.make_graph([], "empty", [], []))


def _mutate_tensor(r: random.Random, t: TensorProto) -> None:
    choice = r.randrange(9)
    if choice == 0:
        del t.dims[:]
        t.dims.extend(r.choice([0, 1, 2, 3, 4, 12, -1, 2**40]) for _ in range(r.randint(0, 5)))
    elif choice == 1:
        t.data_type = r.choice([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 16, 17, 21, 22, 23, 25, 28, 99])
    elif choice == 2 and t.HasField("raw_data"):
        raw = bytearray(t.raw_data)
        cut = r.randint(0, len(raw))
        t.raw_data = bytes(raw[:cut]) if r.random() < 0.5 else bytes(raw) + os.urandom(r.randint(1, 8))
    elif choice == 3 and t.data_type == TensorProto.FLOAT and t.HasField("raw_data") and t.raw_data:
        a = np.frombuffer(t.raw_data, "<f4").copy()
        a[r.randrange(a.size)] = r.choice(FLOATS)
        t.raw_data = a.tobytes()
    elif choice == 4:
        # external data entry with hostile fields
        t.ClearField("raw_data")
        del t.external_data[:]
        for key, value in (
            ("location", r.choice(LOCATIONS)),
            ("offset", str(r.choice([0, 4, 4096, -8, 2**40]))),
            ("length", str(r.choice([0, 4, 432, 1728, 16384, -1, 2**40]))),
        ):
            if r.random() < 0.85:
                e = t.external_data.add()
                e.key, e.value = key, value
        t.data_location = TensorProto.EXTERNAL
    elif choice == 5:
        t.data_location = r.choice([0, 1])
    elif choice == 6 and t.HasField("raw_data"):
        vals = np.frombuffer(t.raw_data[: len(t.raw_data) // 4 * 4], "<f4")
        t.ClearField("raw_data")
        t.float_data.extend(float(v) for v in vals[: r.randint(0, vals.size)])
    elif choice == 7:
        t.name = r.choice(["", "x", "y", "W1", t.name + "_", "[/red]"])
    else:
        scale = r.choice([0.0, -1.0, 1e6, 1e-20, 50.0])
        if t.data_type == TensorProto.FLOAT and t.HasField("raw_data") and len(t.raw_data) % 4 == 0:
            t.raw_data = (np.frombuffer(t.raw_data, "<f4") * np.float32(scale)).astype("<f4").tobytes()


def mutate(m: onnx.ModelProto, r: random.Random) -> None:
    """Apply 1 to 4 random edits; an edit the protobuf runtime refuses (a value out of range) is skipped."""
    for _ in range(r.randint(1, 4)):
        with contextlib.suppress(ValueError, TypeError):
            mutate_graph(m, r)


def mutate_graph(m: onnx.ModelProto, r: random.Random) -> None:
    """Apply one random edit to the model (main graph, or a subgraph / tensor inside it)."""
    g = m.graph
    names = _names(m)
    choice = r.randrange(17)
    if choice == 16 and m.functions:  # a node inside a function body: op, domain, inputs, or a call to itself
        f = r.choice(list(m.functions))
        if f.node:
            fnode = r.choice(list(f.node))
            pick = r.randrange(4)
            if pick == 0:
                fnode.op_type = r.choice([*OPS, f.name])
            elif pick == 1:
                fnode.op_type, fnode.domain = f.name, f.domain
            elif pick == 2 and fnode.input:
                fnode.input[r.randrange(len(fnode.input))] = r.choice([*f.input, "", "undefined"])
            else:
                fnode.domain = r.choice(["", "local", "x"])
        return
    nodes = list(g.node)
    node = r.choice(nodes) if nodes else None
    if choice == 0 and node is not None:
        node.op_type = r.choice(OPS)
    elif choice == 1 and node is not None:
        if node.input and r.random() < 0.6:
            node.input[r.randrange(len(node.input))] = r.choice(
                [*names, "", "undefined", node.output[0] if node.output else "y"]
            )
        elif node.input and r.random() < 0.5:
            del node.input[r.randrange(len(node.input))]
        else:
            node.input.append(r.choice([*names, ""]))
    elif choice == 2 and node is not None:
        if node.output and r.random() < 0.5:
            node.output[r.randrange(len(node.output))] = r.choice([*names, "", "fresh"])
        elif node.output:
            del node.output[r.randrange(len(node.output))]
        else:
            node.output.append("fresh")
    elif choice == 3 and node is not None:
        name = r.choice(ATTRS)
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(_random_attribute(r, name))
    elif choice == 4 and g.initializer:
        _mutate_tensor(r, r.choice(list(g.initializer)))
    elif choice == 5 and nodes:
        r.shuffle(nodes)
        del g.node[:]
        g.node.extend(nodes)
    elif choice == 6 and node is not None:
        copy = g.node.add()
        copy.CopyFrom(node)
        if r.random() < 0.5 and copy.output:
            copy.output[0] = copy.output[0] + "_dup"
    elif choice == 7 and node is not None:
        g.node.remove(node)
    elif choice == 8 and g.initializer:
        t = r.choice(list(g.initializer))
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type or 1, list(t.dims)))
    elif choice == 9 and node is not None and len(node.input) > 1:
        # put a transform between a weight and its reader
        op = r.choice(["Identity", "Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze", "DequantizeLinear"])
        extra = {"Transpose": {"perm": [r.randrange(4) for _ in range(4)]}, "Cast": {"to": r.choice([1, 10, 7])}}
        new = f"{node.input[1]}_{op.lower()}{r.randrange(99)}"
        inputs = [node.input[1]] + ([r.choice(names)] if op in ("Reshape", "Unsqueeze", "DequantizeLinear") else [])
        g.node.insert(0, helper.make_node(op, inputs, [new], **extra.get(op, {})))
        node.input[1] = new
    elif choice == 10:
        if g.output and r.random() < 0.5:
            del g.output[r.randrange(len(g.output))]
        else:
            g.output.append(helper.make_tensor_value_info(r.choice(names), TensorProto.FLOAT, None))
    elif choice == 11 and node is not None:
        node.domain = r.choice(["", "ai.onnx", "com.microsoft", "ai.onnx.ml", "x"])
    elif choice == 12:
        vi = g.input[0] if g.input and r.random() < 0.5 else g.value_info.add()
        if not vi.name:
            vi.name = r.choice(names)
        dims = [r.choice([0, 1, 3, 8, -4, 2**40, 2**62]) for _ in range(r.randint(0, 5))]
        vi.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, dims))
    elif choice == 13:
        del m.opset_import[:]
        m.opset_import.append(helper.make_opsetid("", r.choice([1, 6, 9, 11, 13, 17, 21, 23, 99])))
    elif choice == 14:
        # a tensor in a node attribute (Constant value, subgraph initializers)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    _mutate_tensor(r, a.t)
                    return
                if a.type == onnx.AttributeProto.GRAPH and a.g.initializer:
                    _mutate_tensor(r, r.choice(list(a.g.initializer)))
                    return
        g.node.insert(0, helper.make_node("Constant", [], [r.choice(["W1", "kc"])], value=_constant(r)))
    elif node is not None:
        node.name = r.choice(["", "conv1", "[/bold]", "a\nb", "\x1b[2J", node.name * 2])


def _constant(r: random.Random) -> TensorProto:
    t = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32))
    if r.random() < 0.5:
        _mutate_tensor(r, t)
    return t


# ---------------------------------------------------------------------------------------------------------------
# The harness: one input through onnxclp, outcome classified
# ---------------------------------------------------------------------------------------------------------------


class Harness:
    def __init__(self, root: Path, stats_path: Path, mode: str) -> None:
        self.root, self.stats_path, self.mode = root, stats_path, mode
        self.indir, self.outdir, self.bait = root / "in", root / "out", root / "bait"
        for d in (self.indir, self.outdir, self.bait, self.indir / "sub"):
            d.mkdir(parents=True, exist_ok=True)
        (self.indir / "w.bin").write_bytes(W_BIN)
        (self.bait / "secret.bin").write_bytes(W_BIN)
        self.indir_hash = self._hash_in()
        self.count = 0
        self.outcomes: dict[str, int] = {}
        self.crashes: dict[str, dict] = {}
        self.started = time.monotonic()
        self.last_dump = 0.0
        self.watching = False
        self.escapes: list[str] = []
        sys.addaudithook(self._audit)

    def _hash_in(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self.indir.rglob("*")):
            if p.is_file() and p.name != "model.onnx":
                h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    def _audit(self, event: str, args: tuple) -> None:
        if not self.watching or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(args[0])
        if path.startswith("/proc/self/fd/") or path == os.devnull:
            return  # the saver links its unnamed output files through /proc/self/fd
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
        root = str(self.root.resolve())
        ours = (str(self.indir.resolve()), str(self.outdir.resolve()))
        inside = full in ours or full.startswith(tuple(d + os.sep for d in ours))
        if (full.startswith(root + os.sep) and not inside) or full in ("/etc/passwd", "/proc/self/mem"):
            self.escapes.append(full)

    def one(self, data: bytes) -> None:
        self.count += 1
        model_path = self.indir / "model.onnx"
        model_path.write_bytes(data)
        for p in self.outdir.iterdir():
            p.unlink()
        h = zlib.crc32(data)
        method = ("clp", "lpp")[h & 1]
        score = ("spectral", "l2", "exact")[(h >> 1) % 3]
        fuse = bool(h >> 3 & 1)
        inline = bool(h >> 5 & 1)
        self.escapes = []
        outcome, crash = "ok", None
        signal.alarm(PER_INPUT_S)
        try:
            from onnxclp.api import sanitize_file, scan
            from onnxclp.errors import NothingToSanitize, OnnxclpError
            from onnxclp.io import load_model

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                warnings.simplefilter("ignore", DeprecationWarning)
                self.watching = True
                try:
                    load_model(model_path)
                    scan(model_path, method, score=score, include_fc=bool(h >> 4 & 1), inline_functions=inline)
                    sanitize_file(
                        model_path, self.outdir / "out.onnx", method, score=score, fuse_bn=fuse,
                        inline_functions=inline,
                    )  # fmt: skip
                finally:
                    self.watching = False
                try:
                    load_model(self.outdir / "out.onnx")
                except OnnxclpError as exc:
                    outcome, crash = "crash", ("corrupt-output", type(exc).__name__, exc.message[:120])
        except NothingToSanitize:
            outcome = "nothing-to-sanitize"
        except OnnxclpError:
            outcome = "refused"
        except _Timeout:
            outcome, crash = "crash", ("hang", f"> {PER_INPUT_S} s", "")
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome, crash = "crash", ("exception", type(exc).__name__, _where(exc))
        finally:
            signal.alarm(0)
            self.watching = False
        if self.escapes:
            outcome, crash = "crash", ("file-outside-folder", self.escapes[0], "")
        if self._hash_in() != self.indir_hash:
            outcome, crash = "crash", ("input-changed", "", "")
            (self.indir / "w.bin").write_bytes(W_BIN)
            self.indir_hash = self._hash_in()
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if crash is not None:
            key = " | ".join(crash)
            entry = self.crashes.setdefault(key, {"count": 0, "first_input": None})
            entry["count"] += 1
            if entry["first_input"] is None:
                name = f"{self.mode}-{hashlib.sha1(data).hexdigest()[:12]}.onnx"
                (WORK / "crashes").mkdir(parents=True, exist_ok=True)
                (WORK / "crashes" / name).write_bytes(data)
                entry["first_input"] = name
                entry["options"] = {"method": method, "score": score, "fuse_bn": fuse, "inline_functions": inline}
        now = time.monotonic()
        if now - self.last_dump > 1.0:
            self.dump()
            self.last_dump = now

    def dump(self) -> None:
        elapsed = time.monotonic() - self.started
        stats = {
            "mode": self.mode,
            "inputs": self.count,
            "seconds": round(elapsed, 1),
            "inputs_per_s": round(self.count / max(elapsed, 1e-9), 1),
            "outcomes": self.outcomes,
            "crashes": self.crashes,
        }
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, self.stats_path)


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _where(exc: BaseException) -> str:
    """The innermost frame inside onnxclp (else the innermost frame) of an exception."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/onnxclp/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else "?"


# ---------------------------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------------------------


def _seed_bytes() -> list[bytes]:
    return [s.SerializeToString() for s in seeds()]


def child(mode: str, seconds: float, stats_path: Path, use_atheris: bool, seed: int) -> None:
    signal.signal(signal.SIGALRM, _alarm)
    # An input that makes onnxclp (or a library under it) allocate without bound gets a MemoryError here,
    # counted as a crash, instead of stopping the whole run (libFuzzer's RSS limit would).
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    scratch = Path(tempfile.mkdtemp(prefix=f"onnxclp-fuzz-{mode}-"))
    if use_atheris:
        import atheris

        with atheris.instrument_imports(include=["onnxclp"]):
            import onnxclp.api  # noqa: F401 - imported under instrumentation for coverage feedback
    harness = Harness(scratch, stats_path, mode)
    base = _seed_bytes()
    if use_atheris:
        import atheris

        corpus = WORK / f"corpus-{mode}"
        seed_dir = scratch / "seeds"
        for d in (corpus, seed_dir, WORK / "crashes"):
            d.mkdir(parents=True, exist_ok=True)
        for i, b in enumerate(base):
            (seed_dir / f"seed{i}.onnx").write_bytes(b)

        def graph_mutator(data: bytes, max_size: int, mseed: int) -> bytes:
            r = random.Random(mseed)
            m = onnx.ModelProto()
            try:
                m.ParseFromString(data)
                if not m.HasField("graph"):
                    raise ValueError
            except Exception:
                m.ParseFromString(r.choice(base))
            mutate(m, r)
            try:
                out = m.SerializeToString()
            except Exception:
                out = r.choice(base)
            return out[:max_size]

        args = [
            sys.argv[0],
            f"-max_total_time={int(seconds)}",
            "-rss_limit_mb=8192",
            f"-artifact_prefix={WORK / 'crashes'}/",
            f"-seed={seed}",
            "-max_len=65536",
            "-print_final_stats=1",
            str(corpus),
            str(seed_dir),
        ]
        atheris.Setup(args, harness.one, custom_mutator=graph_mutator if mode == "graph" else None)
        try:
            atheris.Fuzz()
        finally:
            harness.dump()
        return
    r = random.Random(seed)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = r.choice(base)
        if mode == "bytes":
            buf = bytearray(data)
            for _ in range(r.randint(1, 8)):
                op = r.randrange(3)
                i = r.randrange(len(buf))
                if op == 0:
                    buf[i] = r.randrange(256)
                elif op == 1:
                    del buf[i : i + r.randint(1, 16)]
                else:
                    buf[i:i] = os.urandom(r.randint(1, 8))
            data = bytes(buf)
        else:
            m = onnx.ModelProto()
            m.ParseFromString(data)
            mutate(m, r)
            data = m.SerializeToString()
        harness.one(data)
    harness.dump()
    shutil.rmtree(scratch, ignore_errors=True)


def run_mode(mode: str, seconds: float, use_atheris: bool, seed: int) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    stats_path = WORK / f"stats-{mode}.json"
    stats_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", mode, "--seconds", str(seconds), "--seed", str(seed)]
    if not use_atheris:
        cmd.append("--no-atheris")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"inputs": 0, "crashes": {}}
    stats["engine"] = "atheris (libFuzzer)" if use_atheris else "random mutation"
    stats["child_exit"] = proc.returncode
    stats["wall_s"] = round(time.monotonic() - start, 1)
    tail = [line for line in proc.stderr.splitlines() if line.startswith(("Done", "stat::", "==", "INFO: -max"))]
    stats["libfuzzer"] = tail[-8:]
    if proc.returncode != 0:
        stats["child_stderr"] = proc.stderr[-3000:]
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120, help="time per mode")
    ap.add_argument("--mode", choices=["bytes", "graph", "both"], default="both")
    ap.add_argument("--no-atheris", action="store_true", help="random mutation loop instead of libFuzzer")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    use_atheris = not a.no_atheris
    if use_atheris:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed: using the random mutation loop (pip install atheris)")
            use_atheris = False
    if a.child:
        child(a.child, a.seconds, WORK / f"stats-{a.child}.json", use_atheris, a.seed)
        return
    modes = ["bytes", "graph"] if a.mode == "both" else [a.mode]
    print(f"onnxclp fuzzing, {a.seconds:.0f} s per mode, onnx {onnx.__version__}, python {sys.version.split()[0]}")
    for mode in modes:
        s = run_mode(mode, a.seconds, use_atheris, a.seed)
        print(f"\n## {mode} ({s['engine']})")
        print(f"inputs tried: {s['inputs']} in {s.get('seconds', 0)} s ({s.get('inputs_per_s', 0)} /s)")
        print(f"outcomes: {json.dumps(s.get('outcomes', {}))}")
        print(f"unique crashes: {len(s['crashes'])}")
        for key, c in s["crashes"].items():
            print(f"  - {key}  (x{c['count']}, input {c['first_input']}, {c.get('options')})")
        for line in s["libfuzzer"]:
            print(f"  libFuzzer: {line}")
        if s["child_exit"] not in (0,):
            print(f"  fuzzer process exited with {s['child_exit']}:\n{s.get('child_stderr', '')}")


if __name__ == "__main__":
    main()
