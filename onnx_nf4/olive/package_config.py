"""The Olive package config of the ``OnnxNF4Quantization`` pass (standard library only: Olive is not imported).

``olive_config.json`` beside this module (shipped in the package) declares the pass. ``olive run --package-config
FILE`` *replaces* Olive's own pass table with FILE's (olive-ai 0.13: ``OlivePackageConfig.parse_file_or_obj``), so a
workflow that also converts or optimizes the model needs Olive's passes in the same file: :func:`package_config_path`
writes Olive's installed ``olive_config.json`` with this pass added into a cache folder and returns that path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

__all__ = ["PASS_CONFIG_PATH", "PASS_TYPE", "olive_default_config_path", "package_config_path"]

#: The config shipped in the package: this package's pass only.
PASS_CONFIG_PATH = Path(__file__).resolve().parent / "olive_config.json"
#: The pass type a workflow names: ``{"type": "OnnxNF4Quantization", ...}``.
PASS_TYPE = "OnnxNF4Quantization"
#: Where the merged config is written (under ``$XDG_CACHE_HOME``, default ``~/.cache``).
_CACHE_SUBDIR = Path("onnx_nf4") / "olive"


def olive_default_config_path() -> Path:
    """Olive's own ``olive_config.json`` (found without importing ``olive``).

    Raises:
        ModuleNotFoundError: olive-ai is not installed.
    """
    spec = importlib.util.find_spec("olive")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("olive-ai is not installed (pip install olive-ai requests)", name="olive")
    return Path(next(iter(spec.submodule_search_locations))) / "olive_config.json"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / _CACHE_SUBDIR


def package_config_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A package config holding Olive's passes and ``OnnxNF4Quantization``, for ``olive run --package-config``.

    Written once per distinct content (the file name carries a hash of it), atomically, into ``cache_dir``
    (default ``$XDG_CACHE_HOME/onnx_nf4/olive``).

    Raises:
        ModuleNotFoundError: olive-ai is not installed.
    """
    olive = json.loads(olive_default_config_path().read_text())
    ours = json.loads(PASS_CONFIG_PATH.read_text())
    merged = {
        **olive,
        "passes": {**olive.get("passes", {}), **ours["passes"]},
        "extra_dependencies": {**olive.get("extra_dependencies", {}), **ours["extra_dependencies"]},
    }
    text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    path = folder / f"olive_config_{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        os.replace(partial, path)
    return path
