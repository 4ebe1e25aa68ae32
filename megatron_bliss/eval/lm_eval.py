"""lm-evaluation-harness over a megatron_bliss target: log-likelihood scoring, rolling perplexity, greedy decoding.

The scoring is plain functions over a GPT (``gpt_logits``) and one of our tokenizers, usable and tested without
lm-eval installed; :class:`MegatronBlissLM`, the harness's ``LM`` subclass registered as ``megatron_bliss``, only
turns the harness's requests into calls to them and exists only when ``lm_eval`` imports.

Choices that decide the numbers:

- **Tokenization boundary.** A continuation's tokens are those of ``encode(context + continuation)`` after
  ``encode(context)``: the pair is encoded the way the model reads it in one document, never the continuation on its
  own (a SentencePiece model would prefix it with a word-start piece it never has after a context). When the
  context's tokens are not a prefix of the whole's (a context ending in a space, or a word split across the
  boundary), the split moves back to the longest common prefix: the scored tokens then also cover the few context
  characters that merged into the continuation's first token, so the scored text always contains all of the
  continuation. An empty continuation has probability 1 (log 0.0, greedy).
- **Document start.** Every context is preceded by the end-of-document id (``add_eod_prefix``), which is what
  precedes a document's first token in pretraining; an empty context always gets it so that the first continuation
  token is predicted from something.
- **Truncation.** Context is cut on the left so that input and continuation fit ``seq_length`` positions; a
  continuation longer than ``seq_length`` tokens is an error.
- **Vocabulary.** Log-probabilities are a softmax over the tokenizer's ids only: the rows megatron pads the
  vocabulary with are never targets, and greedy decoding never emits them.
- **Rolling log-likelihood.** Each token is predicted exactly once, in disjoint windows of ``seq_length`` predicted
  tokens; the last, shorter window is given the preceding tokens as context up to ``seq_length`` positions, as the
  harness specifies.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence

import torch

from megatron_bliss.models import gpt_logits

logger = logging.getLogger(__name__)

Window = tuple[list[int], int]
"""``(tokens, n)``: the model reads ``tokens[:-1]`` and the last ``n`` targets of ``tokens[1:]`` are scored."""


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, split where the tokens of ``context + continuation`` stop matching
    ``context``'s (see the module docstring).

    Returns:
        ``(context_tokens, continuation_tokens)``, which concatenate to ``tokenizer.tokenize(context + continuation)``.
    """
    whole = tokenizer.tokenize(context + continuation)
    ctx = tokenizer.tokenize(context) if context else []
    n = 0
    for a, b in zip(ctx, whole):
        if a != b:
            break
        n += 1
    return whole[:n], whole[n:]


def continuation_window(context_tokens: list[int], continuation_tokens: list[int], seq_length: int,
                        prefix: Sequence[int] = ()) -> Window:
    """The window scoring ``continuation_tokens`` after ``prefix + context_tokens``, left-truncated so that the
    model reads at most ``seq_length`` tokens."""
    n = len(continuation_tokens)
    if n > seq_length:
        raise ValueError(f"continuation of {n} tokens does not fit seq_length {seq_length}")
    tokens = [*prefix, *context_tokens, *continuation_tokens]
    if len(tokens) - n < 1:
        raise ValueError("a continuation needs at least one token before it (an empty context needs a prefix)")
    return tokens[-(seq_length + 1):], n


def rolling_windows(tokens: list[int], prefix_token: int, seq_length: int) -> list[Window]:
    """Windows that predict every token of ``tokens`` once, after ``prefix_token``, in disjoint runs of
    ``seq_length``; the last run gets up to ``seq_length`` positions of already-scored context."""
    x = [prefix_token, *tokens]
    windows = []
    for a in range(0, len(tokens), seq_length):
        b = min(a + seq_length, len(tokens))  # predicts tokens[a:b] == x[a + 1:b + 1]
        windows.append((x[max(0, b - seq_length):b + 1], b - a))
    return windows


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc)


@torch.no_grad()
def score_windows(model, windows: Sequence[Window], batch_size: int, *, vocab_size: int | None = None,
                  autocast_dtype: torch.dtype | None = None, progress: bool = False) -> list[tuple[float, bool]]:
    """Sum of log-probabilities of each window's scored tokens and whether each is the argmax.

    Windows are sorted by length, longest first (a batch too large for memory fails on the first batch), and
    right-padded: the model is causal, so padding after a row's last input changes none of its logits.

    Args:
        model: a single-stage GPT (``gpt_logits(model, tokens)`` gives ``[b, s, V]``).
        windows: ``(tokens, n)`` pairs, see :data:`Window`.
        batch_size: windows per forward.
        vocab_size: real vocabulary; logits beyond it (megatron's padding rows) are dropped. None keeps all.
        autocast_dtype: e.g. ``torch.bfloat16`` for GPU inference; log-softmax is taken in at least float32.
        progress: show a progress bar.

    Returns:
        ``(log p(scored tokens), all scored tokens are the argmax)`` per window, in the input order.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    results: list = [None] * len(windows)
    with _progress(len(windows), progress, "loglikelihood") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = len(windows[batch[0]][0]) - 1
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens = windows[i][0]
                inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            with _autocast(device, autocast_dtype):
                logits = gpt_logits(model, inputs.to(device))
            logits = logits[..., :vocab_size] if vocab_size else logits
            sums, greedy = [], []
            for row, i in enumerate(batch):
                tokens, n = windows[i]
                end = len(tokens) - 1
                rows = logits[row, end - n:end]
                logprobs = torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
                targets = torch.tensor(tokens[end - n + 1:], device=device)
                sums.append(logprobs.gather(-1, targets[:, None]).sum())
                greedy.append((logprobs.argmax(-1) == targets).all())
            # one device-to-host copy per batch
            for i, total, is_greedy in zip(batch, torch.stack(sums).tolist(), torch.stack(greedy).tolist()):
                results[i] = (float(total), bool(is_greedy))
            if bar is not None:
                bar.update(len(batch))
    return results


def score_continuations(model, tokenizer, requests: Iterable[tuple[str, str]], batch_size: int, seq_length: int,
                        *, add_eod_prefix: bool = True, vocab_size: int | None = None,
                        autocast_dtype: torch.dtype | None = None,
                        progress: bool = False) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), continuation is the greedy decoding)`` for each (context, continuation).

    Args:
        model: a single-stage GPT on its device.
        tokenizer: ``tokenize``/``eod`` (see :func:`megatron_bliss.data.build_tokenizer`).
        requests: ``(context, continuation)`` strings; word-boundary spaces belong to the continuation.
        batch_size: sequences per forward.
        seq_length: positions the model reads (its training length); contexts are left-truncated to fit.
        add_eod_prefix: precede each context with the end-of-document id.
        vocab_size: real vocabulary (default ``tokenizer.vocab_size``).
        autocast_dtype: autocast dtype for the forward, or None.
        progress: show a progress bar.
    """
    windows, empty = [], []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        empty.append(not cont)
        if cont:
            prefix = [tokenizer.eod] if add_eod_prefix or not ctx else []
            windows.append(continuation_window(ctx, cont, seq_length, prefix))
    scored = iter(score_windows(model, windows, batch_size, vocab_size=vocab_size or tokenizer.vocab_size,
                                autocast_dtype=autocast_dtype, progress=progress))
    return [(0.0, True) if is_empty else next(scored) for is_empty in empty]


def rolling_loglikelihood(model, tokenizer, texts: Iterable[str], batch_size: int, seq_length: int, *,
                          vocab_size: int | None = None, autocast_dtype: torch.dtype | None = None,
                          progress: bool = False) -> list[float]:
    """Log-probability of each whole text after an end-of-document id, over :func:`rolling_windows`."""
    windows, owner = [], []
    for i, text in enumerate(texts):
        for window in rolling_windows(tokenizer.tokenize(text), tokenizer.eod, seq_length):
            windows.append(window)
            owner.append(i)
    totals = [0.0] * (max(owner, default=-1) + 1)
    for i, (logprob, _) in zip(owner, score_windows(model, windows, batch_size,
                                                    vocab_size=vocab_size or tokenizer.vocab_size,
                                                    autocast_dtype=autocast_dtype, progress=progress)):
        totals[i] += logprob
    return totals


def _decoded_suffix(tokenizer, context: list[int], generated: list[int]) -> str:
    """Text of ``generated`` as it reads after ``context`` (keeps a leading space that decoding it alone drops)."""
    tail = context[-16:]
    base, full = tokenizer.detokenize(tail), tokenizer.detokenize(tail + generated)
    return full[len(base):] if full.startswith(base) else tokenizer.detokenize(generated)


@torch.no_grad()
def greedy_generate(model, tokenizer, context: str, *, until: Sequence[str] = (), max_gen_toks: int = 256,
                    seq_length: int, add_eod_prefix: bool = True, vocab_size: int | None = None,
                    autocast_dtype: torch.dtype | None = None) -> str:
    """Greedy continuation of ``context``: stops at end-of-document, after ``max_gen_toks`` tokens, or at the first
    stop string (cut off before it). No key-value cache: each token is a forward over the last ``seq_length``."""
    device = next(model.parameters()).device
    vocab_size = vocab_size or tokenizer.vocab_size
    ctx = tokenizer.tokenize(context)
    tokens = ([tokenizer.eod] if add_eod_prefix or not ctx else []) + ctx
    generated: list[int] = []
    text = ""
    for _ in range(max_gen_toks):
        inputs = torch.tensor([(tokens + generated)[-seq_length:]], device=device)
        with _autocast(device, autocast_dtype):
            logits = gpt_logits(model, inputs)[0, -1, :vocab_size]
        token = int(logits.argmax())  # CPU-GPU sync point, once per generated token
        if token == tokenizer.eod:
            break
        generated.append(token)
        text = _decoded_suffix(tokenizer, ctx, generated)
        cuts = [text.find(s) for s in until if s and s in text]
        if cuts:
            return text[:min(cuts)]
    return text


def load_target(checkpoint: str, model_cfg=None, *, tokenizer_path: str | None = None,
                device: str | None = None, precision: str = "auto", model_overrides: dict | None = None):
    """Builds the whole target GPT of a checkpoint for inference in this process (under ``torchrun`` every rank
    builds it, and :class:`MegatronBlissLM` splits the requests over the ranks).

    Args:
        checkpoint: an ``iter_*`` checkpoint or a save_dir (its latest).
        model_cfg: the target's :class:`ModelConfig`; None builds it from ``model_overrides`` when given, else
            from the config saved in the checkpoint.
        tokenizer_path: the tokenizer the target was trained with (default: the bundled 8k BPE).
        device: "auto", "cpu" or "cuda"; the model goes where megatron_bliss.parallel puts it, so "cpu" on a
            machine with GPUs needs ``CUDA_VISIBLE_DEVICES=`` (the CLI sets it).
        precision: "auto" (bf16 autocast on CUDA, fp32 on the CPU), "bf16" or "fp32".
        model_overrides: ModelConfig fields (``preset`` first) used when ``model_cfg`` is None.

    Returns:
        ``(model, tokenizer, model_cfg, autocast_dtype)``.
    """
    from megatron.core import parallel_state as ps

    from megatron_bliss import checkpointing as ckpt
    from megatron_bliss import parallel
    from megatron_bliss.config import from_dict
    from megatron_bliss.data import build_tokenizer
    from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
    from megatron_bliss.models import ModelConfig, build_gpt

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if device == "cpu" and torch.cuda.is_available():
        raise RuntimeError("device 'cpu' requested on a machine with visible GPUs: set CUDA_VISIBLE_DEVICES=")
    resolved = ckpt.resolve(checkpoint)
    if model_cfg is None and model_overrides:
        model_cfg = from_dict(ModelConfig, model_overrides, "model_overrides")
    if model_cfg is None:
        model_cfg = ckpt.model_config(resolved)
    tokenizer = build_tokenizer(tokenizer_path or DEFAULT_TOKENIZER)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model only "
                         f"{model_cfg.vocab_size}: it is not the tokenizer this target was trained with")
    if tokenizer.vocab_size != model_cfg.vocab_size:
        logger.warning("tokenizer has %d ids, model.vocab_size is %d", tokenizer.vocab_size, model_cfg.vocab_size)
    if not ps.model_parallel_is_initialized():
        parallel.initialize(parallel.ParallelConfig())
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("evaluation holds the whole model on every rank: initialize megatron_bliss.parallel "
                           "without tensor or pipeline parallelism (any checkpoint layout loads into it)")
    model = build_gpt(model_cfg)
    ckpt.load_model(resolved, model, model_cfg, role="target")
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto|bf16|fp32, got {precision!r}")
    on_gpu = next(model.parameters()).is_cuda
    bf16 = precision == "bf16" or (precision == "auto" and on_gpu)
    logger.info("evaluating %s (preset %s) on %s, %s", resolved, model_cfg.preset, "cuda" if on_gpu else "cpu",
                "bf16 autocast" if bf16 else "fp32")
    return model.eval(), tokenizer, model_cfg, (torch.bfloat16 if bf16 else None)


def _define_adapter():
    """Defines and registers :class:`MegatronBlissLM`; called only when ``lm_eval`` imports."""
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model("megatron_bliss")
    class MegatronBlissLM(LM):
        """lm-evaluation-harness model over a megatron_bliss GPT and its tokenizer.

        Under ``torchrun`` the harness gives each rank its share of every task's documents; the ranks' results meet
        through torch.distributed (the rank and collectives below), and rank 0 gets the metrics.

        Build it from objects (``MegatronBlissLM(model, tokenizer, seq_length)``) or, through the harness's
        registry, from a checkpoint: ``model_args={"checkpoint": ..., "preset": ..., "tokenizer": ...}`` (any other
        key is a model-config field); see :func:`load_target`.
        """

        def __init__(self, model, tokenizer, seq_length: int, batch_size: int = 16, add_eod_prefix: bool = True,
                     vocab_size: int | None = None, autocast_dtype: torch.dtype | None = None,
                     progress: bool = True) -> None:
            super().__init__()
            self.model, self.tokenizer = model.eval(), tokenizer
            self.seq_length, self.batch_size = seq_length, int(batch_size)
            self.add_eod_prefix, self.progress = add_eod_prefix, progress
            self.vocab_size = vocab_size or tokenizer.vocab_size
            self.autocast_dtype = autocast_dtype
            self._device = next(model.parameters()).device
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            self._rank = torch.distributed.get_rank() if distributed else 0
            self._world_size = torch.distributed.get_world_size() if distributed else 1

        @classmethod
        def create_from_arg_obj(cls, arg_dict, additional_config=None):
            args = {**{k: v for k, v in (additional_config or {}).items() if v is not None}, **dict(arg_dict)}
            args.pop("max_batch_size", None)
            batch_size = int(args.pop("batch_size", 16) or 16)
            model, tokenizer, cfg, autocast_dtype = load_target(
                args.pop("checkpoint"), tokenizer_path=args.pop("tokenizer", None), device=args.pop("device", None),
                precision=args.pop("precision", "auto"), model_overrides=args)
            return cls(model, tokenizer, cfg.seq_length, batch_size, vocab_size=cfg.vocab_size,
                       autocast_dtype=autocast_dtype)

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        def all_gather(self, tensor):
            if self._world_size == 1:
                return tensor
            parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.cat([p.reshape(-1) for p in parts]) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst=0):
            if self._world_size == 1:
                return [obj]
            out = [None] * self._world_size if self._rank == dst else None
            torch.distributed.gather_object(obj, out, dst=dst)
            return out

        def barrier(self) -> None:
            if self._world_size > 1:
                torch.distributed.barrier()

        def _common(self) -> dict:
            return {"vocab_size": self.vocab_size, "autocast_dtype": self.autocast_dtype}

        def _in_chunks(self, kind: str, args: list, score) -> list:
            """``score(args)`` a chunk at a time, handing each chunk's results to the harness's cache as it is
            done: with ``use_cache``, a killed evaluation resumes after its last finished chunk."""
            out = []
            step = self.batch_size * self.CHUNK_BATCHES
            for a in range(0, len(args), step):
                part = score(args[a:a + step])
                for arg, result in zip(args[a:a + step], part):
                    self.cache_hook.add_partial(kind, arg, result)
                out += part
            return out

        CHUNK_BATCHES = 16
        """Batches scored between two cache writes."""

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return self._in_chunks("loglikelihood", [tuple(r.args) for r in requests],
                                   lambda pairs: score_continuations(
                                       self.model, self.tokenizer, pairs, self.batch_size, self.seq_length,
                                       add_eod_prefix=self.add_eod_prefix, progress=self.progress, **self._common()))

        def loglikelihood_rolling(self, requests) -> list[float]:
            return self._in_chunks("loglikelihood_rolling", [tuple(r.args[:1]) for r in requests],
                                   lambda texts: rolling_loglikelihood(
                                       self.model, self.tokenizer, [t[0] for t in texts], self.batch_size,
                                       self.seq_length, progress=self.progress, **self._common()))

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                context, gen_kwargs = request.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen_toks = int(gen_kwargs.pop("max_gen_toks", 256))
                if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0.0) > 0.0:
                    logger.warning("megatron_bliss decodes greedily; ignoring %s", gen_kwargs)
                text = greedy_generate(self.model, self.tokenizer, context, until=until, max_gen_toks=max_gen_toks,
                                       seq_length=self.seq_length, add_eod_prefix=self.add_eod_prefix,
                                       **self._common())
                self.cache_hook.add_partial("generate_until", request.args, text)
                out.append(text)
            return out

    return MegatronBlissLM


try:
    import lm_eval.api.model  # noqa: F401 - optional dependency (pip install megatron_bliss[eval])
except ImportError:
    MegatronBlissLM = None
    """The harness adapter; None when ``lm_eval`` is not installed."""
else:
    MegatronBlissLM = _define_adapter()
