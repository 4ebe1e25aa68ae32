"""Describe a Megatron indexed dataset, optionally decoding a few entries; `--sequence N` prints stored sequence N's
text and the document spans it holds (file:line, token range, url) from the dataset's origins sidecar.

Thin wrapper: the logic is `megatron_bliss.data.commands.inspect_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.data.commands import inspect_main

if __name__ == "__main__":
    sys.exit(inspect_main())
