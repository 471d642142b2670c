"""Graph passes of onnxclp: one module each, every one ``run(state: State) -> PassResult``
(:mod:`onnxclp.pipeline` lists them in order).

- :mod:`~onnxclp.passes.inline`: inline model-local functions (``--inline-functions``).
- :mod:`~onnxclp.passes.fuse_bn`: fold paired BatchNormalizations into their layers (``--fuse-bn``).
- :mod:`~onnxclp.passes.find`: index the graph, find scored layers (and what cannot be scored, with why).
- :mod:`~onnxclp.passes.exclude`: leave out excluded layers and fully connected ones the method does not score.
- :mod:`~onnxclp.passes.score`: score every channel with the method's registered score.
- :mod:`~onnxclp.passes.decide`: the method's decisions (prune, rescale, classifier step).
- :mod:`~onnxclp.passes.streams`: channels pruned in several layers that write one residual stream.
- :mod:`~onnxclp.passes.prune`: apply the decisions to the weights.
- :mod:`~onnxclp.passes.report`: assemble the report.
- :mod:`~onnxclp.passes.annotate`: record what was done in the model's metadata.
"""
