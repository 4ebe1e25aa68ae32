"""Build a real-text C4-format corpus (and a LAMBADA-format sample) from texts Debian packages ship.

Thin wrapper: the logic is `megatron_bliss.data.commands.build_corpus_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.data.commands import build_corpus_main

if __name__ == "__main__":
    sys.exit(build_corpus_main())
