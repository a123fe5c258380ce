"""``python -m onnx_nf4.olive --package-config``: print the path of the Olive package config to give ``olive run``."""

from __future__ import annotations

import argparse
import sys

from .package_config import PASS_CONFIG_PATH, package_config_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnx_nf4.olive", description=__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--package-config", action="store_true",
                      help="Olive's passes plus OnnxNF4Quantization (written once into a cache folder)")  # fmt: skip
    what.add_argument("--pass-config", action="store_true",
                      help="the config shipped in the package: OnnxNF4Quantization only")  # fmt: skip
    args = parser.parse_args(argv)
    if args.pass_config:
        print(PASS_CONFIG_PATH)
        return 0
    try:
        print(package_config_path())
    except ModuleNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
