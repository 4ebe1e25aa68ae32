"""Export a megatron_bliss checkpoint (any TP/PP layout) as a Hugging Face GPTNeoXForCausalLM directory.

Thin wrapper: the logic is `megatron_bliss.export.hf.export_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.export.hf import export_main

if __name__ == "__main__":
    sys.exit(export_main())
