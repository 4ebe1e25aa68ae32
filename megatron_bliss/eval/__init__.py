"""Evaluation of target checkpoints with lm-evaluation-harness (the BLISS zero-shot suite).

``lm_eval`` (this package's module) holds the scoring functions, which need only torch and a GPT, and the harness
adapter ``MegatronBlissLM`` (registered as ``megatron_bliss``), defined only when the optional ``lm_eval`` package
imports (``pip install megatron_bliss[eval]``). ``python -m megatron_bliss.eval`` runs the suite on a checkpoint.

Names are imported lazily, so ``import megatron_bliss.eval`` costs nothing and never needs lm-eval.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "score_continuations": "lm_eval", "score_windows": "lm_eval", "rolling_loglikelihood": "lm_eval",
    "greedy_generate": "lm_eval", "encode_pair": "lm_eval", "rolling_windows": "lm_eval",
    "continuation_window": "lm_eval", "load_target": "lm_eval", "MegatronBlissLM": "lm_eval",
    "EvalConfig": "run", "HarnessConfig": "run", "EvalPaths": "run", "check_tasks": "run", "BLISS_TASKS": "run",
    "run_eval": "run", "summarize": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
