"""The package version, in a module of its own: modules inside onnxclp read it from here (importing it from
``onnxclp`` itself would tie them to everything ``onnxclp/__init__.py`` imports)."""

__version__ = "0.1.0"
