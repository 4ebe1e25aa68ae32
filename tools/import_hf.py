"""Import a Hugging Face GPT-NeoX directory (use_parallel_residual=false) as a megatron_bliss target checkpoint.

Thin wrapper: the logic is `megatron_bliss.export.hf.import_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.export.hf import import_main

if __name__ == "__main__":
    sys.exit(import_main())
