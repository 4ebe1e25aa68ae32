"""Build a real-text C4-format corpus (and a LAMBADA-format sample) from texts that Debian packages ship, offline.

This tool owns turning locally installed public texts into C4-shaped files (``{"text", "url", "timestamp"}`` per
line, gzip-compressed, documents in a seeded random order) and into a LAMBADA-format validation sample
(``{"text": ...}``, the target being the final word). It built the tests' assets (tests/assets/PROVENANCE.md) and
builds the corpora of the preprocessing and selection-quality benchmarks; ``import build_sample_corpus`` (with
``tools/`` on ``sys.path``) gives :func:`build_corpus`, :func:`build_lambada_sample` and :data:`SOURCES`.

    python tools/build_sample_corpus.py --output-dir DIR [--sources ...] [--target-mb M] [--lambada-examples K]

Sources (name: Debian package, license):

* ``kjv``: ``bible-kjv-text`` via the ``bible`` program of ``bible-kjv`` (King James Version, public domain in most
  of the world); every 20th chapter is held out for validation and never enters the corpus.
* ``devil``: ``dict-devil`` (Ambrose Bierce, The Devil's Dictionary, public domain).
* ``jargon``: ``dict-jargon`` (The Jargon File 4.4.7, public domain).
* ``foldoc``: ``dict-foldoc`` (Free On-line Dictionary of Computing, GFDL).
* ``gcide``: ``dict-gcide`` (GNU Collaborative International Dictionary of English, GPL).
* ``fortunes``: ``fortunes`` (BSD fortune cookie files; licenses per file, see the package's copyright).
* ``pydoc``: ``python3.11-doc`` reStructuredText sources (Python Software Foundation License).

Dictionary entries, verses, fortunes and paragraphs are grouped into documents whose lengths follow a seeded
log-normal distribution (median about 650 characters, mean about 1,300, like C4's shorter pages).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_bliss.data.commands import parse_config, run_command, setup_logging

logger = logging.getLogger("build_sample_corpus")

DICTD_DIR = "/usr/share/dictd"
FORTUNES_DIR = "/usr/share/games/fortunes"
PYDOC_DIR = "/usr/share/doc/python3.11/html/_sources"
KJV_HELDOUT_EVERY = 20  # chapter i with i % 20 == 0 is validation text, never corpus text


def kjv_chapters() -> list[tuple[str, list[str]]]:
    """Every KJV chapter as ``(title, verses)``, read through the ``bible`` program (package ``bible-kjv``)."""
    if shutil.which("bible") is None:
        raise FileNotFoundError("the 'bible' program is missing: apt-get install bible-kjv bible-kjv-text")
    text = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters = []
    for block in re.split(r"\n\n(?=\S[^\n]* \d+\n\n)", "\n" + text):
        title, _, body = block.strip("\n").partition("\n\n")
        verses = [" ".join(v.split()) for v in re.split(r"(?:^|\n)\s+\d+ ", body) if v.strip()]
        if verses:
            chapters.append((title.strip(), verses))
    return chapters


def _kjv_units() -> Iterator[str]:
    for i, (_, verses) in enumerate(kjv_chapters()):
        if i % KJV_HELDOUT_EVERY:
            yield from verses


def _dictd_units(name: str) -> Iterator[str]:
    """Entries of a dictd database, via its ``.index`` (headword, base64 offset, base64 length)."""
    alphabet = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def b64(s: str) -> int:
        value = 0
        for c in s:
            value = value * 64 + alphabet[c]
        return value

    with gzip.open(os.path.join(DICTD_DIR, f"{name}.dict.dz"), "rb") as f:
        data = f.read()
    with open(os.path.join(DICTD_DIR, f"{name}.index"), encoding="utf-8", errors="replace") as f:
        spans = sorted({(b64(parts[1]), b64(parts[2])) for line in f
                        if len(parts := line.rstrip("\n").split("\t")) >= 3 and not parts[0].startswith("00")})
    for start, length in spans:
        entry = data[start:start + length].decode("utf-8", errors="replace")
        entry = "\n".join(line.strip() for line in entry.strip().splitlines())
        if len(entry) > 40:
            yield re.sub(r"\n{3,}", "\n\n", entry)


def _fortune_units() -> Iterator[str]:
    for name in sorted(os.listdir(FORTUNES_DIR)):
        path = os.path.join(FORTUNES_DIR, name)
        if "." in name or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for cookie in f.read().split("\n%\n"):
                if len(cookie.strip()) > 20:
                    yield "\n".join(line.rstrip() for line in cookie.strip().splitlines())


def _pydoc_units() -> Iterator[str]:
    for root, dirs, files in os.walk(PYDOC_DIR):
        dirs.sort()
        for name in sorted(files):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                for para in re.split(r"\n\s*\n", f.read()):
                    para = para.strip()
                    if len(para) > 40 and not para.startswith(("..", "===", "---", "***")):
                        yield para


SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "kjv": _kjv_units, "devil": lambda: _dictd_units("devil"), "jargon": lambda: _dictd_units("jargon"),
    "foldoc": lambda: _dictd_units("foldoc"), "gcide": lambda: _dictd_units("gcide"),
    "fortunes": _fortune_units, "pydoc": _pydoc_units,
}


@dataclass
class CorpusConfig:
    """Settings of ``tools/build_sample_corpus.py``; its flags are generated from these fields."""

    output_dir: str = field(default="", metadata={"required": True})
    """Output directory: writes ``c4-train.{i:05d}-of-{n:05d}.json.gz`` (and ``lambada_sample.jsonl``)."""

    sources: list[str] = field(default_factory=lambda: sorted(SOURCES), metadata={"choices": sorted(SOURCES)})
    """Text sources to draw documents from."""

    target_mb: float | None = None
    """Stop at this many MB of JSON lines (default: everything the sources have)."""

    num_files: int = 4
    """Number of output files (documents are dealt round-robin)."""

    seed: int = 0
    """Seed of document lengths, order and timestamps, and of the LAMBADA sample."""

    lambada_examples: int = 0
    """Also write this many LAMBADA-format examples from held-out KJV chapters to ``lambada_sample.jsonl``."""


def group_units(units: Iterator[str], rng: random.Random, median_chars: float = 650.0,
                sigma: float = 0.75) -> Iterator[str]:
    """Joins consecutive text units into documents of log-normally distributed length (units are never split)."""
    doc, size, target = [], 0, rng.lognormvariate(math.log(median_chars), sigma)
    for unit in units:
        doc.append(unit)
        size += len(unit) + 2
        if size >= target:
            yield "\n\n".join(doc)
            doc, size, target = [], 0, rng.lognormvariate(math.log(median_chars), sigma)
    if doc:
        yield "\n\n".join(doc)


def build_corpus(out_dir: str, sources: list[str], target_mb: float | None = CorpusConfig.target_mb,
                 num_files: int = CorpusConfig.num_files, seed: int = CorpusConfig.seed) -> dict:
    """Writes a C4-format corpus ``c4-train.{i:05d}-of-{n:05d}.json.gz`` from offline sources.

    Args:
        out_dir: output directory.
        sources: names from :data:`SOURCES`.
        target_mb: stop once this many MB of JSON lines are produced (None: everything the sources have).
        num_files: number of output files.
        seed: seed for document lengths, order and timestamps.

    Returns:
        A summary: documents and bytes per source and in all, files written.
    """
    rng = random.Random(seed)
    docs: list[tuple[str, int, str]] = []
    for name in sources:
        if name not in SOURCES:
            raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
        for i, text in enumerate(group_units(SOURCES[name](), random.Random(f"{seed}/{name}"))):
            docs.append((name, i, text))
    rng.shuffle(docs)
    lines, total, per_source = [], 0, {}
    for name, i, text in docs:
        stamp = f"2019-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:" \
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
        line = json.dumps({"text": text, "timestamp": stamp, "url": f"https://{name}.example.org/doc/{i}"}) + "\n"
        lines.append(line)
        total += len(line)
        per_source[name] = per_source.get(name, 0) + 1
        if target_mb is not None and total >= target_mb * 1e6:
            break
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for k in range(num_files):
        path = os.path.join(out_dir, f"c4-train.{k:05d}-of-{num_files:05d}.json.gz")
        with gzip.GzipFile(path + ".tmp", "wb", mtime=0) as f:  # mtime=0: byte-identical rebuilds
            f.write("".join(lines[k::num_files]).encode("utf-8"))
        os.replace(path + ".tmp", path)
        files.append(path)
    summary = {"documents": len(lines), "bytes": total, "per_source": per_source, "files": files}
    logger.info("wrote %d documents (%.1f MB) to %d files", len(lines), total / 1e6, num_files)
    return summary


def build_lambada_sample(out_path: str, num_examples: int = 200, seed: int = 0, min_words: int = 40) -> int:
    """Writes LAMBADA-format JSON lines from held-out KJV chapters: passages whose final word is the target.

    Like LAMBADA, a passage ends mid-sentence-free at a word (trailing punctuation removed) and, when possible,
    the target word already occurs in the context.

    Args:
        out_path: output ``.jsonl`` path.
        num_examples: examples to write (fewer if the held-out text runs out).
        seed: selection seed.
        min_words: minimum passage length in words.

    Returns:
        The number of examples written.
    """
    rng = random.Random(seed)
    chapters = [verses for i, (_, verses) in enumerate(kjv_chapters()) if i % KJV_HELDOUT_EVERY == 0]
    candidates = []
    for verses in chapters:
        start = 0
        while start < len(verses):
            words, end = [], start
            while end < len(verses) and len(words) < min_words:
                words += verses[end].split()
                end += 1
            passage = " ".join(words).rstrip(" .,;:!?'\")(")
            target = passage.rsplit(" ", 1)[-1]
            context = passage[: -len(target)]
            if len(words) >= min_words and target.isalpha() and len(target) > 2:
                candidates.append((target.lower() in context.lower(), passage))
            start = end
    rng.shuffle(candidates)
    candidates.sort(key=lambda c: not c[0])  # stable: targets seen in the context first, like LAMBADA
    chosen = candidates[:num_examples]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        for _, passage in chosen:
            f.write(json.dumps({"text": passage}) + "\n")
    os.replace(out_path + ".tmp", out_path)
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    """The command line: builds the corpus (and the LAMBADA sample when asked); exit code 2 on a missing source."""
    cfg = parse_config(CorpusConfig, argv, "Build a C4-format corpus from texts shipped by Debian packages "
                                           "(apt-get install bible-kjv bible-kjv-text dict-gcide dict-jargon "
                                           "dict-devil dict-foldoc fortunes python3.11-doc).")
    setup_logging()

    def build() -> None:
        summary = build_corpus(cfg.output_dir, cfg.sources, cfg.target_mb, cfg.num_files, cfg.seed)
        logger.info("per source: %s", summary["per_source"])
        if cfg.lambada_examples:
            n = build_lambada_sample(os.path.join(cfg.output_dir, "lambada_sample.jsonl"), cfg.lambada_examples,
                                     cfg.seed)
            logger.info("wrote %d LAMBADA-format examples", n)

    return run_command(build)


if __name__ == "__main__":
    sys.exit(main())
