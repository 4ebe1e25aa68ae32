"""Selection quality at small scale: does BLISS pick the data that helps a held-out domain, and does it pay off?

    python bench/selection_quality.py [--corpus auto|sample|build] [--quick] [--threads 2] [--seed 0]

Pool (real text; every sequence is cut inside one document, so it has one domain): clean KJV prose (the validation
domain, 8 % of the pool), corrupted copies of *other* KJV documents (6 % each: words shuffled, one verse repeated,
verse snippets buried in web boilerplate), and the other domains of the corpus in equal parts (GCIDE, FOLDOC, the
Jargon File, the Devil's Dictionary, fortunes, Python's reStructuredText documentation; with ``--corpus sample``
only the Devil's Dictionary and the Jargon File, and a pool of about 700 sequences). Clean plus corrupted KJV is
26 % of the pool, more than the 20 % every selector keeps, so a selector that cannot tell clean from corrupted text
must leave clean text out. Validation: held-out KJV passages (chapters no corpus contains), split in two halves:
one drives the selection (BLISS's upper objective, the baselines' centroid and gradient), the other measures the
target. The losses are full-passage losses (every token after a passage's first is a target: much less noisy than
LAMBADA's last word at this size); the target's last-word loss is reported beside it.

Selectors, each keeping the top 20 % of the pool:
- ``random``: a seeded uniform sample (the baseline); ``random-2`` another draw (how noisy the ratios are);
- ``bliss-cg``: a BLISS round (no KL term) whose z-solve converges: CG on the Gauss-Newton curvature, μ = 0.1;
- ``bliss-amortized``: the same round with the amortized solver (z kept across outer steps, one curvature product on
  each step's batch, Gauss-Newton, μ = 0.1);
- ``bliss-amortized-shared``: ``bliss-amortized`` with ``share_inner_step`` (the hypergradient at the proxy before
  its inner step, on that step's micro-batch: the documented deviation that saves a forward);
- ``bliss-sgd``: the same round with the method's z-solve (3 SGD steps from z = 1/numel, Hessian, μ = 0.01);
- ``dsir``: DSIR, hashed word n-gram importance weights toward the validation text (the ``data-selection``
  package; cheap baseline);
- ``cosine``: cosine between a sequence's mean-pooled hidden state under the warm-up proxy and the validation
  centroid (cheap baseline);
- ``gradsim``: one-step gradient similarity <∇CE_i, ∇f> at the warm-up proxy (cheap baseline);

``dsir``, ``cosine`` and ``gradsim`` are the pipeline's own methods (``megatron_bliss.selection.scorers``, the same
code as ``--run.method=dsir|cosine|gradsim``), called on the in-memory pool;
- ``influence``: c_i = <∇CE_i, (GN + μI)⁻¹ ∇f> at the warm-up proxy with a converged solve on one batch of
  curvature: what BLISS's score model is trained to rank by, without a score model (a diagnostic);
- ``untrained``: the score model every BLISS round starts from (warm-up body, fresh head), untrained (control);
- ``flipped``: the ``bliss-cg`` round with the hypergradient's sign flipped (control);
- ``clean+random``: every clean KJV sequence, the rest at random (a reference, not a method).

Reported: (a) the share of each selection that is clean KJV and that is corrupted KJV (by kind); (b) a target GPT
trained the same number of steps on each subset (same initialization and seed, AdamW at a constant learning rate
after a short warm-up, at most 2.5 epochs of the subset), its held-out KJV loss at the end, and the step ratio:
the first step at which the random subset's curve reached its own final loss / the first step at which this
subset's curve reached that loss (linear interpolation between evaluations; the curves are not monotone, so the
random subset may reach its final loss before its last step). The last line gives the ratio of ``bliss-cg``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the sample-corpus builder

SAMPLE_DIR = os.path.join(ROOT, "tests", "assets", "c4_sample")
SAMPLE_LAMBADA = os.path.join(ROOT, "tests", "assets", "lambada_sample.jsonl")
TOKENIZER = os.path.join(ROOT, "megatron_bliss", "data", "assets", "default_bpe_8k.model")
VALIDATION_DOMAIN = "kjv"
CORRUPTIONS = ("shuffled", "repeated", "boilerplate")
# the solve that converges (docs/bilevel.md, "Which curvature converges"): CG on Gauss-Newton curvature from z = 0
CONVERGING_SOLVE = dict(solver="cg", curvature="gauss_newton", solver_init="zero", damping=0.1, solver_steps=20,
                        cg_tol=1e-2)
METHOD_SOLVE = dict(solver="sgd", curvature="hessian", solver_steps=3)  # the method's: BilevelConfig defaults
# z and its step length kept across outer steps, one curvature product per step on that step's batch
AMORTIZED_SOLVE = dict(solver="amortized", curvature="gauss_newton", damping=0.1, solver_steps=1, cg_tol=1e-2)
AMORTIZED_SHARED_SOLVE = dict(AMORTIZED_SOLVE, share_inner_step=True)
TABLE_ORDER = ("random", "random-2", "bliss-cg", "bliss-amortized", "bliss-amortized-shared", "bliss-sgd", "dsir",
               "cosine", "gradsim", "influence", "untrained", "flipped", "clean+random")

BOOKS = ("Genesis", "Exodus", "Psalms", "Proverbs", "Isaiah", "Matthew", "Mark", "Luke", "John", "Romans", "Acts")
BOILERPLATE = (
    "Home | Bible | {book} | Chapter {n} | Search | Log in",
    "Share this verse: Facebook Twitter Email Print",
    "Copyright 2019 Daily Verse Online. All rights reserved.",
    "Posted by admin on March {n}, 2019 | {k} comments",
    "Click here to subscribe to our newsletter and get the verse of the day in your inbox.",
    "Previous chapter | Next chapter | Back to top",
    "Tags: {book}, scripture, daily reading, devotional",
    "This site uses cookies. By continuing to browse the site you agree to our use of cookies.",
    "Related posts: {book} {n} commentary | Sermon notes | Reading plan",
    "Advertisement",
)


# --------------------------------------------------------------------------------------------------------- data
def read_documents(corpus_dir: str) -> dict:
    """``{domain: [text, ...]}`` from C4-format files whose urls name the source (``https://kjv.example.org/...``)."""
    docs: dict = {}
    for name in sorted(os.listdir(corpus_dir)):
        if name.endswith(".json.gz"):
            with gzip.open(os.path.join(corpus_dir, name), "rt", encoding="utf-8") as f:
                for line in f:
                    doc = json.loads(line)
                    docs.setdefault(doc["url"].split("//", 1)[1].split(".", 1)[0], []).append(doc["text"])
    return docs


def available_sources() -> list:
    """The offline corpus sources whose Debian packages are installed here."""
    from build_sample_corpus import SOURCES

    found = []
    for name, units in SOURCES.items():
        try:
            next(iter(units()))
            found.append(name)
        except Exception:  # noqa: BLE001 - a missing program, file or directory: the source is not installed
            pass
    return found


def load_corpus(args, work: str) -> tuple:
    """``(documents by domain, LAMBADA-format validation path, description)`` for ``--corpus``."""
    from build_sample_corpus import build_corpus, build_lambada_sample

    sources = available_sources() if args.corpus != "sample" else []
    usable = VALIDATION_DOMAIN in sources and len(sources) > 3  # more than the shipped sample's three sources
    if args.corpus == "build" and not usable:
        raise SystemExit(f"--corpus build needs the KJV and more sources; installed: {sources or 'none'} "
                         "(see docs/data.md for the Debian packages)")
    if args.corpus == "sample" or not usable:
        return read_documents(SAMPLE_DIR), SAMPLE_LAMBADA, "the shipped sample (KJV, Devil's Dictionary, Jargon File)"
    corpus_dir = os.path.join(work, f"corpus-seed{args.seed}-" + "-".join(sorted(sources)))
    lambada = os.path.join(corpus_dir, "lambada.jsonl")
    if not os.path.exists(lambada):  # built once per work directory (about 25 s)
        build_corpus(corpus_dir, sorted(sources), num_files=1, seed=args.seed)
        build_lambada_sample(lambada, num_examples=400, seed=args.seed)
    return read_documents(corpus_dir), lambada, "built from the installed sources: " + ", ".join(sorted(sources))


def corrupt(text: str, kind: str, rng: random.Random) -> str:
    """A corrupted copy of a KJV document: words shuffled, one verse repeated, or verses buried in boilerplate."""
    verses = [v for v in text.split("\n\n") if v.strip()]
    if kind == "shuffled":
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)
    if kind == "repeated":
        verse = rng.choice(verses)
        return "\n".join([verse] * max(2, len(text) // (len(verse) + 1)))
    lines = []
    for verse in verses:
        lines += [rng.choice(BOILERPLATE).format(book=rng.choice(BOOKS), n=rng.randint(1, 28), k=rng.randint(0, 40))
                  for _ in range(rng.randint(2, 3))]
        lines.append("Verse of the day: " + " ".join(verse.split()[:10]) + " ... Read more")
    return "\n".join(lines)


def cut_sequences(texts, tokenizer, length: int, limit: int) -> list:
    """Up to ``limit`` sequences of ``length`` tokens cut inside each document (a shorter tail is dropped)."""
    out = []
    for text in texts:
        ids = tokenizer.tokenize(text)
        out.extend(ids[i:i + length] for i in range(0, len(ids) - length + 1, length))
        if len(out) >= limit:
            break
    return out[:limit]


def build_pool(docs: dict, tokenizer, args) -> tuple:
    """``(sequences [N, L+1] int64, kind [N] str)``: clean KJV, corrupted KJV by kind, the other domains."""
    import numpy as np

    rng = random.Random(args.seed)
    others = sorted(d for d in docs if d != VALIDATION_DOMAIN)
    if VALIDATION_DOMAIN not in docs or not others:
        raise ValueError(f"the corpus needs {VALIDATION_DOMAIN!r} documents and at least one other domain")
    for texts in docs.values():
        rng.shuffle(texts)
    length = args.seq_length + 1
    other_share = 1 - args.clean_fraction - len(CORRUPTIONS) * args.corrupt_fraction
    per_other = int(round(args.pool_size * other_share / len(others)))
    parts = {d: cut_sequences(docs[d], tokenizer, length, per_other) for d in others}
    scale = sum(len(p) for p in parts.values()) / (per_other * len(others))  # < 1: a small corpus shrinks the pool
    kjv = docs[VALIDATION_DOMAIN]
    half = len(kjv) // 2  # clean and corrupted sequences come from disjoint KJV documents
    parts["clean"] = cut_sequences(kjv[:half], tokenizer, length, round(args.pool_size * args.clean_fraction * scale))
    for i, kind in enumerate(CORRUPTIONS):
        parts[kind] = cut_sequences((corrupt(t, kind, rng) for t in kjv[half + i::len(CORRUPTIONS)]), tokenizer,
                                    length, round(args.pool_size * args.corrupt_fraction * scale))
    seqs = np.asarray([s for p in parts.values() for s in p], dtype=np.int64)
    kind = np.asarray([k for k, p in parts.items() for _ in p])
    order = np.random.default_rng(args.seed).permutation(len(seqs))
    return seqs[order], kind[order]


def validation_halves(lambada_path: str, work: str) -> tuple:
    """Held-out KJV passages as ``(select, measure)`` halves, each ``(tokens, full-passage mask, last-word mask)``."""
    import numpy as np

    from megatron_bliss.data import load_validation_set, prepare_validation

    prefix = os.path.join(work, "kjv_validation")
    prepare_validation(lambada_path, prefix, TOKENIZER, max_length=64)
    tokens, last_word = load_validation_set(prefix)
    ends = last_word.shape[1] - np.argmax(last_word[:, ::-1], axis=1)
    full = (np.arange(last_word.shape[1])[None, :] < ends[:, None]).astype(np.float32)
    return tuple((tokens[i::2], full[i::2], last_word[i::2]) for i in (0, 1))


# ------------------------------------------------------------------------------------------- language models
def lm_loss(model, tokens, mask=None):
    """Token-mean next-token CE of ``tokens`` ``[b, L]`` (targets where ``mask[:, 1:]``; all tokens without mask)."""
    from megatron_bliss.data.loader import split_next_token
    from megatron_bliss.models.gpt import gpt_logits
    from megatron_bliss.ops import reference as ref

    inputs, labels, m = split_next_token(tokens, mask)
    return ref.token_mean_cross_entropy(gpt_logits(model, inputs), labels, m)


def train_lm(cfg, data, steps: int, args, seed: int, evaluate=None):
    """A GPT trained ``steps`` AdamW steps on ``data`` (epochs of seeded permutations); returns ``(model, curve)``.

    Initialization and batch order depend only on ``seed``; the learning rate warms up linearly over
    ``args.lr_warmup`` steps and then stays constant (no decay, so "steps to reach a loss" compares runs fairly).
    """
    import numpy as np
    import torch

    from megatron_bliss.models.gpt import build_gpt

    torch.manual_seed(seed)
    model = build_gpt(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng, order, curve = np.random.default_rng(seed), np.zeros(0, np.int64), []
    for step in range(1, steps + 1):
        if len(order) < args.batch_size:
            order = np.concatenate([order, rng.permutation(len(data))])
        idx, order = order[:args.batch_size], order[args.batch_size:]
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.lr_warmup)
        loss = lm_loss(model, torch.from_numpy(data[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if evaluate is not None and (step % args.eval_every == 0 or step == steps):
            curve.append((step, evaluate(model)))
    return model, curve


def held_out_losses(model, measure) -> tuple:
    """``(full-passage CE, last-word CE)`` of ``model`` on the measuring half of the validation passages."""
    import torch

    from megatron_bliss.models.gpt import gpt_logits
    from megatron_bliss.ops import reference as ref

    totals = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(measure[0]), 50):  # chunks: the logits of all passages at once would take ~0.4 GB
            tokens, full, last = (torch.from_numpy(a[i:i + 50]) for a in measure)
            token_ce = ref.token_cross_entropy(gpt_logits(model, tokens[:, :-1]), tokens[:, 1:]).double()
            for j, mask in enumerate((full[:, 1:], last[:, 1:])):
                totals[2 * j] += (token_ce * mask).sum()
                totals[2 * j + 1] += mask.sum()
    return float(totals[0] / totals[1]), float(totals[2] / totals[3])


# ------------------------------------------------------------------------------------------------- selectors
@contextlib.contextmanager
def hypergradient_sign(sign: float):
    """Multiplies the score model's hypergradient by ``sign`` inside the block (the sign-flipped control)."""
    from megatron_bliss.bilevel import trainer as trainer_mod

    original = trainer_mod.score_hypergradient

    def signed(*a, **kw):
        out = original(*a, **kw)
        out.grads = [sign * g for g in out.grads]
        return out

    trainer_mod.score_hypergradient = signed
    try:
        yield
    finally:
        trainer_mod.score_hypergradient = original


def run_bliss(proxy_cfg, warm_proxy, pool, select_half, args, out_dir: str, sign: float = 1.0, **solve) -> tuple:
    """One BLISS round (no KL term) from the warm-up proxy; ``(trained logits, untrained logits, info)``."""
    import numpy as np

    from megatron_bliss.bilevel import BilevelConfig, BilevelRunConfig
    from megatron_bliss.bilevel.config import BilevelPaths
    from megatron_bliss.bilevel.trainer import BilevelTrainer
    from megatron_bliss.score.scoring import score_sequences

    b = BilevelConfig(kl_coef=0.0, outer_steps=args.outer_steps, micro_batch_size=args.bilevel_batch,
                      val_micro_batch_size=args.bilevel_batch, score_lr=args.score_lr, proxy_lr=args.proxy_lr,
                      eval_interval=0, residual_interval=args.residual_interval,
                      tensorboard=False, seed=args.seed, score_head_seed=args.seed, **solve)
    trainer = BilevelTrainer(BilevelRunConfig(proxy=proxy_cfg, bilevel=b), BilevelPaths(output_dir=out_dir), pool,
                             select_half[:2])
    trainer.proxy.load_state_dict(warm_proxy.state_dict())  # the warm-up proxy in memory, not from a checkpoint
    trainer.start_round()  # score body from the (warm) proxy, fresh head
    untrained = score_sequences(trainer.score.logit, pool, 256, bf16=False)
    t0, residuals = time.perf_counter(), []
    with hypergradient_sign(sign):
        while trainer.step < b.outer_steps:  # the trainer's loop without checkpoints or metrics files
            metrics = trainer.outer_step()
            trainer.step += 1
            if metrics.get("z_residual") is not None:
                residuals.append(metrics["z_residual"])
    info = {"seconds": time.perf_counter() - t0, "z_residual": float(np.median(residuals)) if residuals else None}
    return score_sequences(trainer.score.logit, pool, 256, bf16=False), untrained, info


def cheap_scores(proxy, tokenizer, pool, select_half, args) -> tuple:
    """The pipeline's baselines (``megatron_bliss.selection.scorers``: cosine to the validation centroid, one-step
    gradient similarity, DSIR) and the converged-solve influence diagnostic; returns ``(scores by name, relative
    residual of the influence solve)``."""
    import numpy as np
    import torch

    from megatron_bliss.bilevel import BilevelConfig, hvp
    from megatron_bliss.bilevel.hypergradient import lower_level_objective, per_sample_directional, solve_z
    from megatron_bliss.score.scoring import score_sequences
    from megatron_bliss.selection import scorers
    from megatron_bliss.selection.config import DsirConfig

    tokens, full, _ = select_half  # every token after a passage's first is a target
    out = {}
    if "cosine" not in args.skip:
        out["cosine"] = score_sequences(scorers.cosine_score_fn(proxy, tokens, full, 256), pool, 256, bf16=False)
    if "gradsim" not in args.skip:
        out["gradsim"] = score_sequences(scorers.gradsim_score_fn(proxy, tokens, full, 64), pool, 64, bf16=False)
    if "dsir" not in args.skip:
        lengths = full.shape[1] - np.argmax(full[:, ::-1] > 0, axis=1)
        out["dsir"] = scorers.dsir_weights(lambda: (tokenizer.detokenize(row.tolist()) for row in pool),
                                           lambda: (tokenizer.detokenize(t[:n].tolist())
                                                    for t, n in zip(tokens, lengths)), DsirConfig())
    residual = None
    if "influence" not in args.skip:  # z on one batch of 32 pool sequences, uniform weights (the round's start)
        g = scorers.validation_gradient_over(proxy, tokens, full, 64)
        cfg = BilevelConfig(kl_coef=0.0, **dict(CONVERGING_SOLVE, solver_steps=50, cg_tol=1e-3))
        batch = torch.from_numpy(pool[np.random.default_rng(args.seed).integers(0, len(pool), 32)])
        operator = hvp.build_operator(lower_level_objective(proxy, batch, torch.full((32,), 1 / 32), None, cfg),
                                      "exact", "gauss_newton")
        solve = solve_z(operator, g, cfg)
        operator.close()
        residual = solve.residual
        out["influence"] = score_sequences(  # c_i = <∇CE_i, z> of every sequence by a central difference
            lambda rows: per_sample_directional(proxy, rows[:, :-1], rows[:, 1:], solve.z, "finite_difference",
                                                1e-2)[1], pool, 64, bf16=False)
    return out, residual


# ---------------------------------------------------------------------------------------------------- report
def steps_to_reach(curve, level: float):
    """First step (linearly interpolated between evaluations) at which ``curve`` is at or below ``level``."""
    prev_step, prev_loss = 0, math.inf
    for step, loss in curve:
        if loss <= level:
            if math.isinf(prev_loss):
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - level) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def table(kind, subsets: dict, results: dict) -> tuple:
    """Markdown rows (a) and (b) per selector, and the step ratios: the first step at which the random subset's
    curve reached its final loss / the first step at which this subset's curve reached it."""
    import numpy as np

    random_curve = [(s, losses[0]) for s, losses in results["random"]]
    level = random_curve[-1][1]
    steps = steps_to_reach(random_curve, level)  # the first step at its final loss (the curve is not monotone)
    lines = ["| selector | clean KJV % | corrupted KJV % | shuffled / repeated / boilerplate % | held-out CE "
             "| last-word CE | steps to random's final CE | step ratio |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    ratios = {}
    for name in [n for n in TABLE_ORDER if n in subsets]:
        sel = kind[subsets[name]]
        share = {c: 100.0 * np.mean(sel == c) for c in ("clean",) + CORRUPTIONS}
        row = (f"| {name} | {share['clean']:.1f} | {sum(share[c] for c in CORRUPTIONS):.1f} | "
               + " / ".join(f"{share[c]:.1f}" for c in CORRUPTIONS) + " |")
        if name in results:
            reach = steps_to_reach([(s, losses[0]) for s, losses in results[name]], level)
            ratios[name] = steps / reach if reach else None
            full_ce, last_ce = results[name][-1][1]
            row += (f" {full_ce:.3f} | {last_ce:.3f} | " + (f"{reach:.0f} | {steps / reach:.2f}x |" if reach
                                                               else "not reached | <1 |"))
        else:
            row += " | | | |"
        lines.append(row)
    return lines, ratios


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", choices=("auto", "sample", "build"), default="auto",
                   help="build: every installed offline source (docs/data.md); sample: the shipped sample only; "
                        "auto: build when more than the sample's sources are installed")
    p.add_argument("--quick", action="store_true", help="smaller pool, shorter runs (about 2-3 minutes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool, the selections and every model")
    p.add_argument("--work-dir", default=None, help="cache for the built corpus (default: a temporary directory)")
    p.add_argument("--pool-size", type=int, default=None, help="sequences in the pool (default 10000; quick 2000)")
    p.add_argument("--outer-steps", type=int, default=None, help="BLISS outer steps (default 60; quick 10)")
    p.add_argument("--target-steps", type=int, default=None, help="target steps per subset (default 300; quick 100)")
    p.add_argument("--warmup-steps", type=int, default=None, help="proxy warm-up steps (default 150; quick 80)")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the pool each selector keeps")
    p.add_argument("--skip", nargs="*", default=[], choices=TABLE_ORDER, help="selectors to leave out")
    args = p.parse_args()
    defaults = dict(pool_size=2000, outer_steps=10, target_steps=100, warmup_steps=80) if args.quick else \
        dict(pool_size=10000, outer_steps=60, target_steps=300, warmup_steps=150)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seq_length, args.clean_fraction, args.corrupt_fraction = 64, 0.08, 0.06
    args.batch_size, args.lr, args.lr_warmup, args.max_epochs = 16, 3e-3, 20, 2.5
    args.bilevel_batch, args.score_lr, args.proxy_lr, args.residual_interval = 8, 1e-3, 1e-4, 10
    return args


def keep_freed_memory() -> None:
    """Asks glibc's malloc to serve every allocation from its heap and keep freed memory there.

    By default a block over 32 MB (the logits of one batch are 33 MB) is a fresh mmap that the kernel zero-fills
    page by page on every step; on a busy 2-core machine that page-fault time equalled the compute (the whole
    benchmark ran 2x slower). Numbers are unchanged. No effect outside glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: no mmap-backed blocks
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back to the kernel
    except (OSError, AttributeError):
        pass


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from megatron_bliss import parallel
    from megatron_bliss.data import build_tokenizer
    from megatron_bliss.models import get_preset
    from megatron_bliss.selection.config import SelectionConfig
    from megatron_bliss.selection.select import select_indices

    start, cpu_start, times = time.perf_counter(), time.process_time(), {}
    parallel.initialize(parallel.ParallelConfig(seed=args.seed))
    tmp = tempfile.TemporaryDirectory()
    work = args.work_dir or tmp.name
    os.makedirs(work, exist_ok=True)
    docs, lambada, corpus_name = load_corpus(args, work)
    tokenizer = build_tokenizer(TOKENIZER)
    pool, kind = build_pool(docs, tokenizer, args)
    select_half, measure_half = validation_halves(lambada, tmp.name)
    k = int(round(args.fraction * len(pool)))
    args.target_steps = min(args.target_steps, max(1, int(args.max_epochs * k / args.batch_size)))
    args.eval_every = max(1, args.target_steps // (15 if args.target_steps >= 150 else 8))
    shape = dict(vocab_size=tokenizer.vocab_size, make_vocab_size_divisible_by=64, seq_length=args.seq_length,
                 attention_backend="local")
    proxy_cfg, target_cfg = get_preset("tiny", num_layers=1, **shape), get_preset("tiny", **shape)
    counts = {c: int((kind == c).sum()) for c in dict.fromkeys(kind)}
    times["data"] = time.perf_counter() - start
    print(f"corpus: {corpus_name}")
    print(f"pool: {len(pool)} sequences of {args.seq_length + 1} tokens: "
          + ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    print(f"validation: {len(select_half[0])} held-out KJV passages drive the selection, {len(measure_half[0])} "
          "others measure the target")
    print(f"proxy: 1 layer, hidden 64; target: 2 layers, hidden 64; vocabulary {tokenizer.vocab_size}; "
          f"each selector keeps {k} sequences; target: {args.target_steps} steps of {args.batch_size}")
    print("config: " + json.dumps({key: v for key, v in vars(args).items() if key != "work_dir"}), flush=True)

    t0 = time.perf_counter()  # warm-up proxy: a random fifth of the pool
    rng = np.random.default_rng(args.seed)
    proxy, _ = train_lm(proxy_cfg, pool[rng.permutation(len(pool))[:max(len(pool) // 5, 64)]], args.warmup_steps,
                        args, seed=args.seed)
    times["proxy warm-up"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, influence_residual = cheap_scores(proxy, tokenizer, pool, select_half, args)
    times["cheap baselines"] = time.perf_counter() - t0
    info = {}
    for name, solve in (("bliss-cg", CONVERGING_SOLVE), ("bliss-amortized", AMORTIZED_SOLVE),
                        ("bliss-amortized-shared", AMORTIZED_SHARED_SOLVE), ("bliss-sgd", METHOD_SOLVE),
                        ("flipped", dict(CONVERGING_SOLVE, sign=-1.0))):
        if name not in args.skip:
            scores[name], untrained, info[name] = run_bliss(proxy_cfg, proxy, pool, select_half, args,
                                                            os.path.join(tmp.name, name), **solve)
            scores.setdefault("untrained", untrained)  # every round starts from the same score model
            times[name] = info[name]["seconds"]

    subsets = {name: select_indices(s, SelectionConfig(method="top", fraction=args.fraction))
               for name, s in scores.items()}
    for name, seed in (("random", args.seed), ("random-2", args.seed + 1)):
        subsets[name] = select_indices(np.zeros(len(pool)), SelectionConfig(method="random", fraction=args.fraction,
                                                                            seed=seed))
    clean, rest = np.flatnonzero(kind == "clean"), np.flatnonzero(kind != "clean")
    subsets["clean+random"] = np.sort(np.concatenate([clean[:k], rng.choice(rest, max(0, k - len(clean)),
                                                                            replace=False)]))
    subsets = {name: idx for name, idx in subsets.items() if name not in args.skip or name == "random"}

    t0, results = time.perf_counter(), {}
    for name in [n for n in TABLE_ORDER if n in subsets]:
        _, results[name] = train_lm(target_cfg, pool[subsets[name]], args.target_steps, args, seed=args.seed + 1,
                                    evaluate=lambda model: held_out_losses(model, measure_half))
        print(f"  target on {name}: held-out CE " + " ".join(f"{s}:{losses[0]:.3f}" for s, losses in results[name]),
              flush=True)
    times["targets"] = time.perf_counter() - t0

    lines, ratios = table(kind, subsets, results)
    print()
    print("\n".join(lines))
    print()
    pool_share = {c: 100.0 * counts.get(c, 0) / len(pool) for c in ("clean",) + CORRUPTIONS}
    print(f"pool: clean KJV {pool_share['clean']:.1f} %, corrupted " + " / ".join(
        f"{pool_share[c]:.1f}" for c in CORRUPTIONS) + " %; influence solve: relative residual "
        f"{influence_residual or float('nan'):.2g}; " + "; ".join(f"{n}: median z residual {i['z_residual']:.2g}"
                                                  for n, i in info.items() if i["z_residual"] is not None))
    print("seconds: " + ", ".join(f"{n} {v:.0f}" for n, v in times.items())
          + f"; total {time.perf_counter() - start:.0f} wall, {time.process_time() - cpu_start:.0f} CPU")
    ratio = ratios.get("bliss-cg")
    print("headline: steps to the random subset's final held-out KJV loss, random / BLISS (CG, Gauss-Newton): "
          + (f"{ratio:.2f}x" if ratio else "not reached"))
    tmp.cleanup()


if __name__ == "__main__":
    main()
