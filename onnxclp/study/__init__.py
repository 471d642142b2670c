"""Studying a defence on real models: u-sweeps, calibration on clean images, trigger-activated change, plots.

- :mod:`onnxclp.study.measure`: prepare a data set once, measure ACC/ASR of models held in memory.
- :mod:`onnxclp.study.sweep`: ACC, ASR and channels pruned against u (CLP paper Figure 4), or any settings.
- :mod:`onnxclp.study.calibrate`: the smallest u within a clean-accuracy budget.
- :mod:`onnxclp.study.tac`: trigger-activated change per channel (CLP paper section 4.2, Figure 3).
- :mod:`onnxclp.study.plots`: the figures.
- the ``sweep`` and ``tac`` commands live in :mod:`onnxclp.cli.study`; ``scan --plot`` calls :mod:`.plots`; ``sanitize --clean-data`` tunes u in the pipeline (:mod:`onnxclp.passes.tune`), and :mod:`.calibrate` is the study tool's walk on a prepared set.

Importing this package is cheap; torch, onnxruntime and matplotlib load when a function that needs them runs.
"""
