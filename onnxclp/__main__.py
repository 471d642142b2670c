"""``python -m onnxclp``: the command-line interface."""

from onnxclp.cli import main

main()
