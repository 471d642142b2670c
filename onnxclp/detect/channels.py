"""``channels``: does some layer hold a channel whose Lipschitz score is an outlier beyond chance?

CLP's observation (Zheng et al., ECCV 2022, section 4.2-4.3): backdoor channels have an unusually large channel
Lipschitz constant (UCLC) within their layer. Per hidden layer with at least 8 channels, the largest channel's
robust z-score of the log score, ``(log s_max - median log s) / (1.4826 MAD log s)`` (log: channel scores are
skewed, the log is closer to symmetric); p-value of the largest of K standard normals (Sidak), then the smallest
over layers, Bonferroni-corrected for the number of layers. Target: none (a channel does not name a class).

Opt-in (``scan --detector channels``), not part of the default verdict: the within-model normal null does not
hold on clean trained models — clean zoo ResNets and randomly initialised exports get p-values far below 0.05
(docs/detect.md has the measured values), because channel scores have heavier tails than a normal distribution.
"""

from __future__ import annotations

import numpy as np

from onnxclp.detect import Detector, DetectorResult, max_normal_p, register
from onnxclp.detect.classifier import anomaly_index
from onnxclp.pipeline import State

MIN_CHANNELS = 8


@register
class Channels(Detector):
    name = "channels"
    default = False
    description = "an outlying channel score in some layer (robust z of log UCLC, Sidak per layer, Bonferroni)"

    def run(self, state: State) -> DetectorResult | str:
        best: tuple[float, float, str] | None = None
        tested = 0
        for sl in state.scored:
            s = np.asarray(sl.scores, dtype=np.float64)
            if sl.layer.is_output or s.size < MIN_CHANNELS or not np.all(s > 0):
                continue
            tested += 1
            z = float(anomaly_index(np.log(s)).max())
            p = max_normal_p(z, s.size)
            if best is None or p < best[0]:
                best = (p, z, sl.layer.key)
        if best is None:
            return f"no hidden layer with {MIN_CHANNELS} or more positively scored channels"
        p, z, key = best
        return DetectorResult(z, min(1.0, p * tested), None, f"layer {key}: robust z {z:.2f} ({tested} layers tested)")
