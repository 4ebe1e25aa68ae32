"""Scoring without lm-eval: continuations, truncation, greedy flags, rolling windows and greedy decoding agree with
a direct per-request computation (``gpt_logits`` + ``log_softmax`` in float64, one request at a time)."""

import pytest
import torch

from megatron_bliss.eval.lm_eval import (
    encode_pair,
    greedy_generate,
    rolling_loglikelihood,
    rolling_windows,
    score_continuations,
    score_windows,
)
from megatron_bliss.models import gpt_logits
from tests.eval.conftest import SEQ

LONG_CONTEXT = ("In the beginning the earth was without form, and void; and darkness was upon the face of the deep. "
                "And the evening and the morning were the first day, and the light was divided from the darkness.")
REQUESTS = [
    ("Question: Which planet is closest to the Sun?\nAnswer:", " Mercury"),
    ("Question: Which planet is closest to the Sun?\nAnswer:", " the largest gas giant"),
    ("The cat sat on the", " mat."),
    ("", " Paris is the capital of France."),
    (LONG_CONTEXT, " And it was so."),  # longer than SEQ tokens: left-truncated
    ("Water freezes at", " zero degrees Celsius"),
    ("A", " b"),
]


def _token_logprobs(model, tokens, vocab):
    """log p(tokens[i+1] | tokens[:i+1]) for every i, and the argmax at every position, from one forward."""
    logits = gpt_logits(model, torch.tensor([tokens[:-1]]))[0, :, :vocab]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(tokens[1:])
    return logprobs[torch.arange(len(targets)), targets], logprobs.argmax(-1) == targets


def _reference(model, tokenizer, context, continuation):
    whole, ctx = tokenizer.tokenize(context + continuation), tokenizer.tokenize(context)
    assert whole[:len(ctx)] == ctx  # these requests split cleanly at the boundary
    n = len(whole) - len(ctx)
    tokens = ([tokenizer.eod] + whole)[-(SEQ + 1):]
    token_lp, hit = _token_logprobs(model, tokens, tokenizer.vocab_size)
    return token_lp[-n:].sum().item(), bool(hit[-n:].all())


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_continuations_match_direct_computation(tiny_target, batch_size):
    model, tokenizer, _ = tiny_target
    assert len(tokenizer.tokenize(LONG_CONTEXT)) > SEQ
    got = score_continuations(model, tokenizer, REQUESTS, batch_size, SEQ)
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        ref_logprob, ref_greedy = _reference(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(ref_logprob, rel=1e-12, abs=1e-10), (context, continuation)
        assert greedy == ref_greedy
    assert len({round(lp, 6) for lp, _ in got}) == len(REQUESTS)  # the requests really differ


def test_empty_continuation_and_too_long_continuation(tiny_target):
    model, tokenizer, _ = tiny_target
    assert score_continuations(model, tokenizer, [("Some context", "")], 2, SEQ) == [(0.0, True)]
    with pytest.raises(ValueError, match="does not fit seq_length"):
        score_continuations(model, tokenizer, [("A", " " + LONG_CONTEXT)], 2, SEQ)


def test_greedy_flag(tiny_target):
    model, tokenizer, cfg = tiny_target
    tokens = [tokenizer.eod] + tokenizer.tokenize("The cat sat")
    for _ in range(4):  # extend with the model's own argmax: scoring these is greedy by construction
        logits = gpt_logits(model, torch.tensor([tokens]))[0, -1, :tokenizer.vocab_size]
        tokens.append(int(logits.argmax()))
    wrong = tokens[:-1] + [(tokens[-1] + 1) % tokenizer.vocab_size]
    got = score_windows(model, [(tokens, 4), (wrong, 4), (wrong[:-1], 3)], batch_size=2,
                        vocab_size=tokenizer.vocab_size)
    assert [g for _, g in got] == [True, False, True]
    assert got[0][0] > got[1][0]


def test_encode_pair_boundary(tiny_target):
    _, tokenizer, _ = tiny_target
    for context, continuation in [("Answer:", " Paris"), ("Answer: ", "Paris"), ("hello", "world"), ("", " x")]:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        assert ctx + cont == tokenizer.tokenize(context + continuation)
        assert tokenizer.detokenize(cont).strip() and continuation.strip() in tokenizer.detokenize(cont)
    # a context ending in a space: the space merges into the continuation's first token, which is scored whole
    ctx, cont = encode_pair(tokenizer, "Answer: ", "Paris")
    assert ctx == tokenizer.tokenize("Answer:") and cont == encode_pair(tokenizer, "Answer:", " Paris")[1]


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 171))  # 71 tokens, windows of 32
    windows = rolling_windows(tokens, 0, 32)
    assert [n for _, n in windows] == [32, 32, 7]
    assert all(len(w) <= 33 for w, _ in windows) and len(windows[-1][0]) == 33  # the last one has full context
    assert sum((w[-n:] for w, n in windows), []) == tokens
    assert windows[0][0][0] == 0 and windows[1][0][0] == tokens[31]  # disjoint: window 2 starts where 1 ended


@pytest.mark.parametrize("batch_size", [1, 2])
def test_rolling_loglikelihood(tiny_target, batch_size):
    model, tokenizer, _ = tiny_target
    short = "And God saw the light, that it was good."
    long_text = " ".join([LONG_CONTEXT] * 3)
    tokens = tokenizer.tokenize(long_text)
    assert len(tokens) > 3 * SEQ
    got = rolling_loglikelihood(model, tokenizer, [short, long_text], batch_size, SEQ)
    # a text within one window: the sum of every token's log-probability in one forward after eod
    short_lp, _ = _token_logprobs(model, [tokenizer.eod] + tokenizer.tokenize(short), tokenizer.vocab_size)
    assert got[0] == pytest.approx(short_lp.sum().item(), rel=1e-12)
    # a long text: token j is predicted once, from the start of its window of SEQ (the last window: SEQ back)
    x, expected = [tokenizer.eod] + tokens, 0.0
    for a in range(0, len(tokens), SEQ):
        b = min(a + SEQ, len(tokens))
        start = max(0, b - SEQ)
        token_lp, _ = _token_logprobs(model, x[start:b + 1], tokenizer.vocab_size)
        expected += token_lp[a - start:].sum().item()
    assert got[1] == pytest.approx(expected, rel=1e-12)


def test_greedy_generate_and_stop_strings(tiny_target):
    model, tokenizer, _ = tiny_target
    context = "Question: What causes day and night?\nAnswer:"
    tokens, generated = [tokenizer.eod] + tokenizer.tokenize(context), []
    for _ in range(8):
        logits = gpt_logits(model, torch.tensor([(tokens + generated)[-SEQ:]]))[0, -1, :tokenizer.vocab_size]
        if int(logits.argmax()) == tokenizer.eod:
            break
        generated.append(int(logits.argmax()))
    text = greedy_generate(model, tokenizer, context, max_gen_toks=8, seq_length=SEQ)
    assert text.strip() == tokenizer.detokenize(generated).strip() and len(text) > 6
    stop = text[4:6]
    assert greedy_generate(model, tokenizer, context, until=["\u00a7", stop], max_gen_toks=8,
                           seq_length=SEQ) == text[:text.find(stop)]
    assert greedy_generate(model, tokenizer, context, max_gen_toks=2, seq_length=SEQ) == \
        _prefix_text(tokenizer, context, generated[:2])


def _prefix_text(tokenizer, context, generated):
    from megatron_bliss.eval.lm_eval import _decoded_suffix

    return _decoded_suffix(tokenizer, tokenizer.tokenize(context), generated)


def test_import_needs_no_lm_eval():
    import subprocess
    import sys

    code = ("import sys; sys.modules['lm_eval'] = None; import megatron_bliss.eval as e; "
            "from megatron_bliss.eval import score_continuations, EvalConfig; assert e.MegatronBlissLM is None")
    subprocess.run([sys.executable, "-c", code], check=True)
