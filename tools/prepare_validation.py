"""Turn LAMBADA-format (or context/continuation) JSON lines into a validation set with a target-only loss mask.

Thin wrapper: the logic is `megatron_bliss.data.commands.prepare_validation_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.data.commands import prepare_validation_main

if __name__ == "__main__":
    sys.exit(prepare_validation_main())
