"""Preprocessing throughput: ``tools/preprocess_c4.py`` end to end, per worker count, optionally beside Megatron-LM.

Every run is a fresh process timed from launch to exit (imports, pool start-up, reading, tokenizing, writing .bin/
.idx and manifest). Runs are interleaved and repeated; the table shows each configuration's fastest repeat, the
usual way to read timings on a shared machine. When ``--megatron-lm`` points at a Megatron-LM checkout, its
``tools/preprocess_data.py`` (``--append-eod``, SentencePiece) runs on the same single plain JSON-lines file and the
last line is the ratio of end-to-end docs/s per core; both tools get the same cores. In ``documents`` mode the two
outputs should be byte-identical (same tokens, same index), which the bench checks.

Usage:
    python bench/preprocess.py --input 'corpus/*.json.gz' --tokenizer-model sp32k.model --workers 1,2 \
        [--megatron-lm PATH --megatron-pythonpath EXTRA] [--repeats 3]
"""

import argparse
import glob
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN_REFERENCE_DOCS_PER_S = 2100.0  # Megatron-LM preprocess_data.py, 2 workers, 2 cores, 64 MB / 50k docs


def _plain_corpus(patterns, workdir):
    """One uncompressed JSON-lines file with every input (Megatron-LM reads a single plain file)."""
    files = sorted(f for p in patterns for f in glob.glob(p)) or patterns
    if len(files) == 1 and not files[0].endswith(".gz"):
        return files[0]
    path = os.path.join(workdir, "corpus.json")
    with open(path, "wb") as out:
        for f in files:
            with (gzip.open(f, "rb") if f.endswith(".gz") else open(f, "rb")) as src:
                shutil.copyfileobj(src, out, 1 << 22)
    return path


def _children_cpu():
    """CPU seconds (user + system) of every finished, reaped descendant so far (workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd, **kw):
    """Runs ``cmd``; returns (wall seconds, CPU seconds of it and its descendants, completed process)."""
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - start, _children_cpu() - cpu0, proc


def _run_ours(corpus, args, workers, prefix):
    for old in glob.glob(prefix + "*"):
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_c4.py"), "--input", corpus, "--output-prefix",
           prefix, "--tokenizer-model", args.tokenizer_model, "--tokens-per-sequence", str(args.tokens_per_sequence),
           "--mode", args.mode, "--workers", str(workers), "--no-progress"]
    wall, cpu, proc = _timed(cmd)
    if proc.returncode:
        raise RuntimeError(f"tools/preprocess_c4.py failed:\n{proc.stderr[-3000:]}")
    with open(prefix + ".manifest.json") as f:
        manifest = json.load(f)
    return wall, cpu, manifest["counts"]["documents"], manifest["counts"]["tokenized_tokens"]


def _run_megatron(corpus, args, workers, prefix):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (args.megatron_lm, args.megatron_pythonpath) if p))
    cmd = [sys.executable, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
           args.tokenizer_model, "--workers", str(workers), "--append-eod", "--log-interval", "1000000"]
    wall, cpu, proc = _timed(cmd, env=env, cwd=tempfile.gettempdir())
    if proc.returncode:
        raise RuntimeError(f"Megatron-LM preprocess_data.py failed:\n{proc.stderr[-3000:]}")
    idx = prefix + "_text_document.idx"
    with open(idx, "rb") as f:
        head = f.read(34)
    docs = int.from_bytes(head[18:26], "little")
    tokens = os.path.getsize(prefix + "_text_document.bin") // (2 if head[17] == 8 else 4)
    return wall, cpu, docs, tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", default="documents", choices=("documents", "sequences"))
    p.add_argument("--tokens-per-sequence", type=int, default=1025)
    p.add_argument("--megatron-lm", help="a Megatron-LM checkout (its tools/preprocess_data.py is run)")
    p.add_argument("--megatron-pythonpath", help="extra PYTHONPATH for Megatron-LM's own imports")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(workdir, exist_ok=True)
    corpus = _plain_corpus(args.input, workdir)
    mb = os.path.getsize(corpus) / 1e6
    workers = [int(w) for w in args.workers.split(",")]
    tools = [("ours", _run_ours)] + ([("megatron-lm", _run_megatron)] if args.megatron_lm else [])
    best = {}
    for _ in range(args.repeats):
        for name, run in tools:
            for w in workers:
                result = run(corpus, args, w, os.path.join(workdir, f"{name}_w{w}"))
                if (name, w) not in best or result[0] < best[(name, w)][0]:
                    best[(name, w)] = result
    cores = os.cpu_count()
    print(f"corpus: {mb:.1f} MB, {best[('ours', workers[0])][2]:,} documents; mode {args.mode}; {cores} cores; "
          f"fastest of {args.repeats} runs, wall time from launch to exit; CPU s = user+system of all its processes")
    print("| tool | workers | wall s | CPU s | docs/s | tokens/s | docs/s per worker | tokens/s per worker | "
          "docs per CPU-s | MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, w), (wall, cpu, docs, tokens) in sorted(best.items()):
        print(f"| {name} | {w} | {wall:.2f} | {cpu:.2f} | {docs / wall:,.0f} | {tokens / wall:,.0f} | "
              f"{docs / wall / w:,.0f} | {tokens / wall / w:,.0f} | {docs / cpu:,.0f} | {mb / wall:.2f} |")
    top = max(workers)
    ours = best[("ours", top)][2] / best[("ours", top)][0]
    ours_cpu = best[("ours", top)][2] / best[("ours", top)][1]
    if args.megatron_lm:
        theirs = best[("megatron-lm", top)][2] / best[("megatron-lm", top)][0]
        theirs_cpu = best[("megatron-lm", top)][2] / best[("megatron-lm", top)][1]
        if args.mode == "documents":
            same = all(open(os.path.join(workdir, f"ours_w{top}{s}"), "rb").read() ==
                       open(os.path.join(workdir, f"megatron-lm_w{top}_text_document{s}"), "rb").read()
                       for s in (".bin", ".idx"))
            print(f"outputs byte-identical to Megatron-LM's: {'yes' if same else 'NO'}")
        print(f"headline: {ours:,.0f} vs {theirs:,.0f} docs/s end to end at --workers {top} on the same "
              f"{min(top, cores)} cores: {ours / theirs:.2f}x Megatron-LM's docs/s per core "
              f"({ours_cpu / theirs_cpu:.2f}x its docs per CPU-second)")
    else:
        print(f"headline: {ours:,.0f} docs/s end to end at --workers {top}: {ours / DESIGN_REFERENCE_DOCS_PER_S:.2f}x "
              f"the recorded Megatron-LM reference ({DESIGN_REFERENCE_DOCS_PER_S:,.0f} docs/s on 2 cores)")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
