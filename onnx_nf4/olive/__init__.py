"""Olive integration (layer 7.2, above ``genai``): the ``OnnxNF4Quantization`` pass and its package config.

``onnx_nf4.olive.quantization.OnnxNF4Quantization`` is an ``olive.passes.Pass``; Olive finds it through a package
config (``olive run --package-config``): :func:`package_config_path` (also ``python -m onnx_nf4.olive
--package-config``) writes Olive's own config with this package's pass added and returns its path. Only
``onnx_nf4.olive.quantization`` imports ``olive``; this module and :mod:`onnx_nf4.olive.package_config` import the
standard library only, so ``import onnx_nf4.olive`` works without Olive installed. May import every lower layer
(``api``, ``passes``, ``methods``, ``runtime``, ...). See docs/olive.md.
"""

from __future__ import annotations

from .package_config import PASS_CONFIG_PATH, PASS_TYPE, package_config_path

__all__ = ["PASS_CONFIG_PATH", "PASS_TYPE", "package_config_path"]
