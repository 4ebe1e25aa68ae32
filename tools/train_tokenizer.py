"""Train a SentencePiece BPE tokenizer offline from a sample of C4-format input.

Thin wrapper: the logic is `megatron_bliss.data.commands.train_tokenizer_main`; run with `--help` for the options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.data.commands import train_tokenizer_main

if __name__ == "__main__":
    sys.exit(train_tokenizer_main())
