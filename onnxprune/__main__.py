"""``python -m onnxprune``: the command line, where the ``onnxprune`` script is not on PATH."""

import sys

from .cli import main

sys.exit(main())
