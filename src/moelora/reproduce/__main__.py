"""``python -m moelora.reproduce [--quick] [--tasks ...] [--seeds N] [--cache DIR]``."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .cli import main

sys.exit(main())
