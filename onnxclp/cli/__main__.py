"""``python -m onnxclp.cli``: the command-line interface (as ``python -m onnxclp``)."""

from onnxclp.cli import main

main()
