"""The method protocol: what every registered defence declares, and the parameters it takes.

A method is one module in :mod:`onnxclp.methods` that defines a subclass of :class:`Method` and decorates it
with :func:`onnxclp.methods.register`. The CLI's options and help, ``onnxclp methods``, the report, annotate,
sweep and calibrate read everything from these declarations (docs/algorithms.md lists each method with its paper).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.select import Selection, TopK

if TYPE_CHECKING:
    from onnxclp.pipeline import State

# What a method reads besides the model's weights.
NEEDS = ("nothing", "clean-data")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: its Python name, type, default and help; the CLI flag is ``--name-with-dashes``.

    ``minimum``/``maximum`` bound the value (inclusive); ``risky_below`` marks values that prune far more than
    the paper's settings do: they need ``force`` (dangerous parameters are never accepted silently);
    ``calibration`` lists the values ``--calibrate`` tries for a parameter other than ``u``, least invasive first.
    """

    name: str
    type: type
    default: Any
    help: str
    short: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    risky_below: float | None = None
    # ``--calibrate``: candidate values from the least invasive to the most (None: not calibrated, kept as given)
    calibration: tuple[float, ...] | None = None
    choices: tuple[str, ...] | None = None  # the allowed values of a str parameter

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Params:
    """A method's resolved parameters: its own ``values`` plus the score and the fully-connected rule."""

    method: str
    score: str
    include_fc: bool
    values: Mapping[str, Any] = field(default_factory=dict)
    # the parameters the caller set (the rest are defaults): the guard's tuning (onnxclp.passes.tune) leaves these
    given: frozenset[str] = frozenset()

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def as_dict(self) -> dict[str, Any]:
        """The report's and the model metadata's ``params``: method, the method's values, score, include_fc."""
        return {"method": self.method, **self.values, "score": self.score, "include_fc": self.include_fc}


class Method:
    """Base class of a registered defence. Subclasses set the class attributes and implement :meth:`select`
    (score-based methods) or override :meth:`decide` (methods that run the model)."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown by ``onnxclp methods`` and in --help
    paper: ClassVar[str]  # title and venue; docs/algorithms.md has the section
    needs: ClassVar[str] = "nothing"  # one of NEEDS
    extra: ClassVar[str | None] = None  # the optional extra its decide() imports (None: numpy only)
    score: ClassVar[str | None] = "spectral"  # default channel score (onnxclp.scoring); None: reads no score
    include_fc: ClassVar[bool] = False  # score hidden fully connected layers by default
    output_fc: ClassVar[bool] = False  # score the classifier (output FC) even when include_fc is off
    rescales: ClassVar[bool] = False  # may rescale channels (report column, metadata counter)
    # whether the ``prune`` pass applies the decisions to the input network (lpp-gate: they shape a copy instead)
    prunes_input: ClassVar[bool] = True
    # each layer's channels are selected from that layer's own statistics (CLP, LPP): the residual-stream rule
    # may then merge a stream channel's decisions; False for methods that decide jointly (ANP's masks, OTBR's
    # global ranking), whose decisions are left as they are
    per_layer: ClassVar[bool] = True
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    # a method kept for experiments, whose measured damage the user must see: the sentence the report and stderr give
    experimental: ClassVar[str | None] = None

    # -- parameters -----------------------------------------------------------------------------------------------
    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The defaults of every parameter, the score and the FC rule (``onnxclp methods --json``)."""
        return {**{p.name: p.default for p in cls.params}, "score": cls.score, "include_fc": cls.include_fc}

    @classmethod
    def spec(cls, name: str) -> ParamSpec | None:
        return next((p for p in cls.params if p.name == name), None)

    def check(self, values: Mapping[str, Any]) -> None:
        """Refuse values outside each parameter's declared range; subclasses add relations between them."""
        for p in self.params:
            v = values[p.name]
            if p.choices is not None and v not in p.choices:
                raise OnnxclpError(f"{p.flag} must be one of {', '.join(p.choices)}, got {v!r}")
            if p.type is float and not math.isfinite(v):
                raise OnnxclpError(f"{p.flag} must be a finite number")
            if p.minimum is not None and v < p.minimum:
                raise OnnxclpError(f"{p.flag} must be >= {p.minimum:g}")
            if p.maximum is not None and v > p.maximum:
                raise OnnxclpError(f"{p.flag} must be <= {p.maximum:g}")

    def risky(self, values: Mapping[str, Any]) -> list[str]:
        """Parameter values below their ``risky_below`` mark, as ``--flag value`` strings."""
        return [
            f"{p.flag} {values[p.name]:g}"
            for p in self.params
            if p.risky_below is not None and values[p.name] < p.risky_below
        ]

    # -- decisions ------------------------------------------------------------------------------------------------
    def precheck(self, state: State) -> None:
        """Refuse a model the method cannot work on before the clean images are read (default: nothing)."""
        return None

    def select(self, scores: np.ndarray, params: Params) -> Selection:
        """Channels to prune / rescale in one hidden layer, from its scores (pure numpy)."""
        raise NotImplementedError(f"method {self.name!r} selects no channels from scores")

    def classifier_step(self, w: np.ndarray, params: Params) -> TopK | None:
        """An edit of the classifier's weight ``w`` (classes, inputs); None: the classifier is left alone."""
        return None

    def decide_for_tuning(self, state: State) -> None:
        """The decisions the guard's tuning measures (:mod:`onnxclp.passes.tune`): :meth:`decide` unless a method
        does more than decide channels (``clp-npd`` then trains)."""
        self.decide(state)

    def decide(self, state: State) -> None:
        """Fill ``state.decisions``; the default applies :meth:`select` to every scored layer's scores."""
        from onnxclp.passes.decide import decide_by_scores

        decide_by_scores(state, self)
