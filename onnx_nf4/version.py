"""The package version: the single source of ``onnx_nf4.__version__`` and of the wheel's version (pyproject.toml)."""

__version__ = "0.1.0"
