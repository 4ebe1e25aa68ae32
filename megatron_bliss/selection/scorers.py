"""The selection baselines' scores of a shard, on the same schedule as BLISS: DSIR, representation cosine, one-step
gradient similarity, and user-supplied scores.

Each method produces what BLISS's scoring produces, one float32 score per stored sequence of the shard
(``scores.npy``), so the pipeline's select, train and evaluation phases are the same for every method, and the
top-k choice is always :func:`megatron_bliss.selection.select_indices`'s.

- ``cosine`` and ``gradsim`` are scorers of :func:`megatron_bliss.score.scoring.run_scoring` (chunked, resumable,
  data-parallel like BLISS's score model): :class:`CosineScorer` and :class:`GradSimScorer`, both at the warm-up
  proxy ``paths.checkpoint``.
- ``dsir`` (:func:`dsir_scores`) is the ``data-selection`` package's ``HashedNgramDSIR`` fed the shard's and the
  validation set's texts through its load/parse hooks; its log-importance weights are the scores.
- ``scores`` (:func:`check_user_scores`) reads a file the user supplies per round, refused (naming the file) unless
  it holds one finite floating-point score per sequence.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import torch

from megatron_bliss.config import to_dict
from megatron_bliss.selection.config import DsirConfig

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- helpers
def _validation_arrays(prefix: str, seq_length: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [N, T], loss_mask [N, T])`` of a validation set, rows of at most ``seq_length + 1`` tokens."""
    from megatron_bliss.data.validation import load_validation_set

    tokens, mask = load_validation_set(prefix, max_length=seq_length + 1)
    if limit is not None:
        tokens, mask = tokens[:limit], mask[:limit]
    return tokens, mask


def _real_lengths(mask: np.ndarray) -> np.ndarray:
    """Tokens of each right-padded validation example: up to and including its last target."""
    return mask.shape[1] - np.argmax(mask[:, ::-1] > 0, axis=1)


def _dataset_fingerprint(prefix: str) -> dict:
    from megatron_bliss.data.indexed import file_sha256

    files = [prefix + ".idx"] + ([prefix + ".targets.npy"] if os.path.exists(prefix + ".targets.npy") else [])
    return {"path": os.path.realpath(prefix), **{os.path.basename(f): file_sha256(f) for f in files}}


def _checkpoint_fingerprint(path: str) -> dict:
    from megatron_bliss.checkpointing import resolve
    from megatron_bliss.pipeline.manifest import path_checksum

    return {"checksum": path_checksum(resolve(path))}


def _load_proxy(cfg, paths):
    from megatron_bliss.checkpointing import load_model
    from megatron_bliss.models.gpt import build_gpt

    proxy = build_gpt(cfg.model)
    load_model(paths.checkpoint, proxy, cfg.model)
    proxy.eval()
    return proxy


class _ProxyScorer:
    """A scorer of :func:`~megatron_bliss.score.scoring.run_scoring` at the warm-up proxy ``paths.checkpoint`` and
    the validation set: its scores depend on the checkpoint, the validation set and the method's section."""

    name = ""

    def __init__(self, valid_prefix: str, config):
        self.valid_prefix, self.config = valid_prefix, config

    def fingerprint(self, cfg, paths) -> dict:
        return {"method": self.name, "checkpoint": _checkpoint_fingerprint(paths.checkpoint),
                "valid": _dataset_fingerprint(self.valid_prefix), self.name: to_dict(self.config)}

    def _inputs(self, cfg, paths) -> tuple:
        """``(proxy, validation tokens, validation mask)``."""
        tokens, mask = _validation_arrays(self.valid_prefix, cfg.model.seq_length, self.config.val_examples)
        return _load_proxy(cfg, paths), tokens, mask


# -------------------------------------------------------------------------------------------------------- cosine
class CosineScorer(_ProxyScorer):
    """cos(pool(h_i), c): ``pool`` the mean of the warm-up proxy's final-LayerNorm hidden states over a sequence's
    positions, c the mean of the validation examples' pooled states (each pooled over its own tokens, up to its
    last target). ``config`` is a :class:`~megatron_bliss.selection.config.CosineConfig`."""

    name = "cosine"
    autocast = True

    def build(self, cfg, paths):
        return cosine_score_fn(*self._inputs(cfg, paths), cfg.scoring.micro_batch_size)


@torch.no_grad()
def cosine_score_fn(proxy, val_tokens: np.ndarray, val_mask: np.ndarray, micro_batch_size: int):
    """``fn(tokens [b, L]) -> [b]``: the cosine of :class:`CosineScorer` at ``proxy`` for validation examples
    ``val_tokens``/``val_mask`` (right-padded, ``[N, T]``)."""
    from megatron_bliss import parallel
    from megatron_bliss.models.gpt import gpt_features

    device = parallel.get_device()
    lengths = torch.from_numpy(_real_lengths(val_mask)).to(device)
    total = torch.zeros(proxy.config.hidden_size, dtype=torch.float64, device=device)
    for start in range(0, len(val_tokens), micro_batch_size):
        rows = torch.from_numpy(np.asarray(val_tokens[start:start + micro_batch_size])).to(device)
        h = gpt_features(proxy, rows, logits=False)[0].double()
        keep = torch.arange(rows.shape[1], device=device)[None, :] < lengths[start:start + micro_batch_size, None]
        total += ((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)).sum(0)
    centroid = (total / len(val_tokens)).float()

    @torch.no_grad()
    def score(batch):
        pooled = gpt_features(proxy, batch, logits=False)[0].float().mean(dim=1)
        return torch.nn.functional.cosine_similarity(pooled, centroid[None].to(pooled.dtype), dim=1)

    return score


# ------------------------------------------------------------------------------------------------------- gradsim
class GradSimScorer(_ProxyScorer):
    """⟨∇CE_i, ∇f⟩ at the warm-up proxy: CE_i a sequence's mean next-token loss, f the validation loss (token mean
    over every masked target of the validation examples used). ∇f is computed once per scoring run (on every rank,
    in micro-batches); each micro-batch's c_i are one batched directional derivative along it
    (:func:`megatron_bliss.bilevel.hypergradient.per_sample_directional`, no per-sequence backward). ``config`` is a
    :class:`~megatron_bliss.selection.config.GradSimConfig`."""

    name = "gradsim"
    autocast = False  # a central difference in bf16 is noise

    def build(self, cfg, paths):
        return gradsim_score_fn(*self._inputs(cfg, paths), cfg.scoring.micro_batch_size, self.config.method,
                                self.config.fd_eps)


def _gradsim_method(proxy, requested: str) -> str:
    """``jvp`` or ``finite_difference`` (``auto``: jvp where forward-mode AD can run)."""
    from megatron_bliss import parallel
    from megatron_bliss.bilevel.hvp import resolve_engine

    choice = resolve_engine("auto", requested if requested != "auto" else "auto", "gauss_newton",
                            attention_backend=getattr(proxy, "attention_backend", "local"),
                            tp_size=parallel.tensor_parallel_size(), params_dtype=next(proxy.parameters()).dtype)
    return choice.mixed_term


def validation_gradient_over(proxy, val_tokens: np.ndarray, val_mask: np.ndarray, micro_batch_size: int) -> list:
    """∇f of the token-mean loss over every masked target of the validation examples, in micro-batches."""
    from megatron_bliss import parallel
    from megatron_bliss.bilevel.hypergradient import validation_gradient

    device = parallel.get_device()
    count = float(np.asarray(val_mask)[:, 1:].sum())
    if count == 0:
        raise ValueError("the validation examples have no target token")
    total = [torch.zeros_like(p, dtype=torch.float64) for p in proxy.parameters()]
    for start in range(0, len(val_tokens), micro_batch_size):
        rows = {"tokens": torch.from_numpy(np.asarray(val_tokens[start:start + micro_batch_size])).to(device),
                "loss_mask": torch.from_numpy(np.asarray(val_mask[start:start + micro_batch_size])).to(device)}
        grads, _ = validation_gradient(proxy, rows, local=True)
        share = float(rows["loss_mask"][:, 1:].sum()) / count  # this micro-batch's targets in the token mean
        for acc, g in zip(total, grads):
            acc.add_(g.double(), alpha=share)
    return [t.to(p.dtype) for t, p in zip(total, proxy.parameters())]


def gradsim_score_fn(proxy, val_tokens: np.ndarray, val_mask: np.ndarray, micro_batch_size: int,
                     method: str = "auto", fd_eps: float = 1e-2):
    """``fn(tokens [b, L]) -> [b]``: ⟨∇CE_i, ∇f⟩ of :class:`GradSimScorer` at ``proxy``."""
    from megatron_bliss.bilevel.hypergradient import per_sample_directional

    method = _gradsim_method(proxy, method)
    direction = validation_gradient_over(proxy, val_tokens, val_mask, micro_batch_size)

    def score(batch):
        return per_sample_directional(proxy, batch[:, :-1], batch[:, 1:], direction, method, fd_eps)[1].detach()

    return score


# ---------------------------------------------------------------------------------------------------------- dsir
def _decoder(prefix: str, setting: str):
    from megatron_bliss.data.provenance import tokenizer_file
    from megatron_bliss.data.tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_file(prefix, setting, "dsir, which reads the texts,"))


def check_texts(prefix: str, setting: str) -> None:
    """Refuses (naming the setting) a dataset whose texts cannot be decoded: DSIR's check before any phase."""
    _decoder(prefix, setting)


def shard_texts(prefix: str, setting: str = "paths.shards"):
    """The stored sequences of a shard as text, in order (decoded with the tokenizer its manifest names)."""
    from megatron_bliss.data.sequences import read_sequences

    tokenizer = _decoder(prefix, setting)
    for row in read_sequences(prefix):
        yield tokenizer.detokenize(np.asarray(row).tolist())


def validation_texts(prefix: str, setting: str = "paths.valid_prefix"):
    """Each validation example as text, up to and including its last target."""
    from megatron_bliss.data.loader import read_examples

    tokenizer = _decoder(prefix, setting)
    tokens, mask, _ = read_examples(prefix)
    for row, n in zip(tokens, _real_lengths(mask)):
        yield tokenizer.detokenize(row[:n].tolist())


def dsir_scores(shard_prefix: str, valid_prefix: str, config: DsirConfig, work_dir: str | None = None) -> np.ndarray:
    """HashedNgramDSIR's log-importance weight of every stored sequence of the shard toward the validation texts
    (:func:`dsir_weights` over the decoded shard and validation set)."""
    return dsir_weights(lambda: shard_texts(shard_prefix), lambda: validation_texts(valid_prefix), config, work_dir)


def dsir_weights(raw_texts, target_texts, config: DsirConfig, work_dir: str | None = None) -> np.ndarray:
    """``float32`` log-importance weights of the texts ``raw_texts()`` yields toward those of ``target_texts()``.

    The package reads examples through its load/parse hooks: here the hooks yield the texts, one example each, in
    order (one process, so its weights file keeps that order). ``work_dir`` holds its cache (a temporary directory
    by default).
    """
    from data_selection import HashedNgramDSIR

    with tempfile.TemporaryDirectory(dir=work_dir) as cache:
        dsir = HashedNgramDSIR(["raw"], ["target"], cache_dir=cache, raw_load_dataset_fn=lambda _: raw_texts(),
                               raw_parse_example_fn=str, target_load_dataset_fn=lambda _: target_texts(),
                               target_parse_example_fn=str,
                               num_proc=1, ngrams=config.ngrams, num_buckets=config.num_buckets,
                               tokenizer=config.tokenizer)
        dsir.fit_importance_estimator(num_tokens_to_fit=config.raw_tokens_to_fit or "auto")
        dsir.compute_importance_weights()
        weights = np.load(os.path.join(cache, "log_importance_weights", "0.npy"))
    return weights.astype(np.float32)


# -------------------------------------------------------------------------------------------------------- scores
def check_user_scores(path: str, num_sequences: int, setting: str) -> np.ndarray:
    """The scores in a user's ``.npy`` file, refused unless it holds ``num_sequences`` finite floating-point values
    (the error names the file and the setting)."""
    if not os.path.isfile(path):
        raise ValueError(f"{setting}: {path} does not exist")
    try:
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{setting}: {path} is not a readable .npy array ({exc})") from None
    if scores.ndim != 1 or len(scores) != num_sequences:
        raise ValueError(f"{setting}: {path} holds an array of shape {tuple(scores.shape)}; the shard has "
                         f"{num_sequences} sequences, so one score each, shape ({num_sequences},)")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"{setting}: {path} holds {scores.dtype} values; scores must be floating point (an integer "
                         "array is more likely indices than scores)")
    finite = np.isfinite(scores)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{setting}: {path} holds {int((~finite).sum())} NaN or infinite scores (the first at "
                         f"index {bad})")
    return np.asarray(scores, dtype=np.float32)
