"""Residual streams: scored layers whose outputs are added into the same tensor, channel for channel.

Not in either paper. In a ResNet with identity shortcuts, channel k of the stem's output and channel k of each
block's last convolution are summed into one channel of the residual stream (``y = x + F(x)``). CLP and LPP
decide per layer (CLP paper section 4.5: a threshold on the mean and spread of one layer's scores), so they
can prune channel k in two of those layers on two independent decisions; together the two prunes remove
channel k of the stream for every layer after them, which neither prune alone does (measured on the zoo's BPP
model: pruning either of two such channels removes the backdoor for 8 or 16 points of accuracy, pruning both
costs 50; docs/results.md).

:func:`residual_streams` groups the scored layers that write the same stream; :func:`coupled_prunes` (pure)
lists the channels pruned in more than one layer of a group, so that the report can say so.

The walk is conservative: it follows only operators that keep channel k in channel k (element-wise
activations, per-channel or scalar constants, BatchNormalization, pooling) and merges by Add, Sum or Sub of
two or more computed tensors. Anything else (a convolution, Concat, Reshape, a product of two computed tensors
such as a squeeze-and-excitation gate) ends the stream, so a coupling it reports is real and some may be missed.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxclp.graph import GraphIndex
from onnxclp.layers import Layer
from onnxclp.pipeline import PassResult, State

# Element-wise on one computed input, channel k to channel k (pooling is spatial only).
_PASS_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Tanh",
        "Softplus",
        "Mish",
        "Identity",
        "Dropout",
        "BatchNormalization",
        "MaxPool",
        "AveragePool",
        "LpPool",
    }
)
# Element-wise binary: a pass-through with one computed input and constants, a merge with two or more computed.
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "PRelu"})
_MERGE = frozenset({"Add", "Sub", "Sum"})


@dataclass(frozen=True)
class Stream:
    """Scored layers (by key) whose outputs are summed, channel for channel, through the ``merges`` nodes."""

    layers: tuple[str, ...]
    merges: tuple[str, ...]


@dataclass(frozen=True)
class Coupling:
    """Channel ``channel`` pruned in several layers of one residual stream."""

    channel: int
    layers: tuple[str, ...]
    merge: str  # the first node (in graph order) where their outputs are summed


class _Sets:
    """Union-find over tensor names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def residual_streams(index: GraphIndex, layers: list[Layer]) -> list[Stream]:
    """The groups of two or more scored layers (same channel count) whose outputs meet in an Add/Sum/Sub."""
    sets = _Sets()
    merges: list[tuple[int, str, str]] = []  # (position, node key, output tensor)
    for node in index.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output or not node.output[0]:
            continue
        out = node.output[0]
        computed = [x for x in node.input if x and index.constant(x) is None]
        if node.op_type in _PASS_UNARY and node.input and node.input[0] in computed:
            sets.union(node.input[0], out)
        elif node.op_type in _BINARY | _MERGE and len(computed) == 1:
            # x + c, x * c, x / c, PRelu(x, slope): constant operands never move a value to another channel
            if node.op_type not in ("Sub", "Div") or node.input[0] in computed:
                sets.union(computed[0], out)
        elif node.op_type in _MERGE and len(computed) >= 2:
            for x in computed:
                sets.union(x, out)
            merges.append((index.position[id(node)], index.node_key(node), out))
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.output and not layer.is_output:
            groups.setdefault(sets.find(layer.output), []).append(layer)
    merges_of: dict[str, list[str]] = {}
    for _, key, out in sorted(merges):
        merges_of.setdefault(sets.find(out), []).append(key)
    streams = []
    for root, members in groups.items():
        via = tuple(merges_of.get(root, ()))
        by_width: dict[int, list[str]] = {}
        for layer in members:
            by_width.setdefault(layer.channels, []).append(layer.key)
        for keys in by_width.values():
            if via and len(keys) >= 2:
                streams.append(Stream(tuple(keys), via))
    return streams


def coupled_prunes(streams: list[Stream], pruned: dict[str, list[int]]) -> list[Coupling]:
    """Channels pruned in two or more layers of one stream (``pruned``: layer key -> pruned channels)."""
    out = []
    for stream in streams:
        hits: dict[int, list[str]] = {}
        for key in stream.layers:
            for k in pruned.get(key, ()):
                hits.setdefault(int(k), []).append(key)
        out += [Coupling(k, tuple(keys), stream.merges[0]) for k, keys in sorted(hits.items()) if len(keys) >= 2]
    return out


STREAM_RULES = ("strongest", "all")


def strongest_only(couplings: list[Coupling], z: dict[str, dict[int, float]]) -> tuple[list[str], dict[str, list[int]]]:
    """Stream-aware decision (pure): for each channel pruned in several layers of one stream, keep the prune
    only in the layer where that channel's score is the most outlying (largest z-score; ties: first layer).
    Returns the kept layer of each coupling and, per layer, the channels whose prune is withdrawn."""
    kept: list[str] = []
    withdrawn: dict[str, list[int]] = {}
    for c in couplings:
        keep = max(c.layers, key=lambda key: (z[key][c.channel], -c.layers.index(key)))
        kept.append(keep)
        for key in c.layers:
            if key != keep:
                withdrawn.setdefault(key, []).append(c.channel)
    return kept, withdrawn


def run(state: State) -> PassResult:
    """Pipeline pass: find channels pruned in two or more layers of one residual stream (report ``coupled``).

    With the stream rule ``strongest`` (``Options.streams``, the default; docs/algorithms.md, "Residual
    streams"), such a channel is one decision: it stays pruned only in the layer where it is the most outlying,
    the other prunes are withdrawn (noted in the layer's report). ``all`` keeps every layer's decision.
    """
    from onnxclp.report import CoupledChannels

    pruned = {d.scored.layer.key: d.selection.prune for d in state.decisions if d.selection.prune}
    if sum(len(v) for v in pruned.values()) < 2:
        return PassResult()
    assert state.index is not None
    streams = residual_streams(state.index, [d.scored.layer for d in state.decisions])
    couplings = coupled_prunes(streams, pruned)
    state.coupled = [CoupledChannels(c.channel, list(c.layers), c.merge) for c in couplings]
    if state.options.streams != "strongest" or not couplings or not state.method.per_layer:
        return PassResult(len(state.coupled))
    z: dict[str, dict[int, float]] = {}
    for d in state.decisions:
        key = d.scored.layer.key
        if key in pruned:  # each flagged channel's z-score within its own layer
            s = d.scored.scores.astype(float)
            std = float(s.std(ddof=1)) if s.size > 1 else 0.0
            z[key] = {k: (float(s[k]) - float(s.mean())) / (std if std > 0 else 1.0) for k in pruned[key]}
    kept, withdrawn = strongest_only(couplings, z)
    for d in state.decisions:
        gone = withdrawn.get(d.scored.layer.key)
        if gone:
            d.selection.prune = [k for k in d.selection.prune if k not in gone]
            note = f"stream rule 'strongest': channel(s) {sorted(gone)} left to the stream's most outlying layer"
            d.note = f"{d.note}; {note}" if d.note else note
    for c, keep in zip(state.coupled, kept, strict=True):
        c.kept = keep
    return PassResult(len(state.coupled))
