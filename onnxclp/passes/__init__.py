"""Graph passes of onnxclp, each a module with one entry point (see STYLE.md: one pass, one file).

- :mod:`~onnxclp.passes.fuse_bn`: fold paired BatchNormalizations into their layers.
- :mod:`~onnxclp.passes.score`: score every scored layer's channels.
- :mod:`~onnxclp.passes.decide`: CLP or LPP decisions from the scores.
- :mod:`~onnxclp.passes.prune`: apply the decisions to the weights.
- :mod:`~onnxclp.passes.annotate`: record what was done in the model's metadata.
"""
