"""Tokenize C4 JSON lines (or pass the DsDm parquet pool through) into Megatron .bin/.idx shards.

Thin wrapper: the logic is `megatron_bliss.data.commands.preprocess_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.data.commands import preprocess_main

if __name__ == "__main__":
    sys.exit(preprocess_main())
