"""Write the top-scored (or a random) subset of an indexed dataset as a new indexed dataset.

Thin wrapper: the logic is `megatron_bliss.data.commands.select_subset_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.data.commands import select_subset_main

if __name__ == "__main__":
    sys.exit(select_subset_main())
