"""``python -m onnx_nf4``: the ``onnx-nf4`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
