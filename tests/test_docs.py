"""README.md, docs/, bench/README.md and the examples name only files, modules, stages and config keys that exist.

What is checked, in each scanned text (markdown: code blocks, inline code, links and prose; example scripts: all
of them; example configs: their comments only):

- repository paths: tokens that start with a top-level entry of the repository (``tools/...``, ``docs/...``,
  ``setup.py``, ...) exist; a glob or ``{a,b}`` pattern matches at least one file. User-side paths (``data/...``,
  ``runs/...``, ``/shared/...``) start with none of those entries and are not checked;
- relative markdown links resolve from the linking file's directory;
- ``-m megatron_bliss.X`` names a module (a package: one with ``__main__``), ``megatron-bliss STAGE`` a stage of
  ``megatron_bliss.cli.STAGES``, and a ``megatron_bliss.X.Y`` name in code a module or attribute;
- config keys: ``--section.key`` anywhere in code, and ``section.key`` in code whose ``section`` is a section of
  one of ``ROOT_CONFIGS`` (or one of ``STAGE_SECTIONS``), are fields of that section; a ``section.key`` that is not
  a key may still be a name relative to the package (``data.subsets.write_subset``) or a file (``scoring.json``).
  YAML blocks whose top-level keys are all sections are checked key by key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import importlib
import importlib.util
import os
import re
import types
import typing

import yaml

from tests.conftest import REPO_ROOT

ROOT_CONFIGS = (
    "megatron_bliss.pretrain.config:PretrainRunConfig",
    "megatron_bliss.bilevel.config:BilevelRunConfig",
    "megatron_bliss.score.config:ScoreRunConfig",
    "megatron_bliss.pipeline.config:PipelineRunConfig",
    "megatron_bliss.eval:EvalConfig",
)
"""The run-config root dataclasses of the stages; their dataclass-typed fields are the config sections."""

STAGE_SECTIONS = (
    ("paths", "megatron_bliss.bilevel.config:BilevelPaths"),
    ("paths", "megatron_bliss.score.config:ScorePaths"),
    ("paths", "megatron_bliss.pretrain.config:PretrainPaths"),
    ("paths", "megatron_bliss.eval.run:EvalPaths"),
    ("paths", "megatron_bliss.pipeline.config:PipelinePaths"),
    ("run", "megatron_bliss.plan:DryRunOptions"),
)
"""Sections a stage loads beside its root (``parse_cli(..., paths_cls=...)``): the files the stage reads and writes;
and the dry-run flags every stage takes (``run_stage``)."""

TOP_DIRS = ("megatron_bliss", "tools", "examples", "docs", "bench", "tests", "scripts", "csrc", ".ci")
TOP_FILES = ("setup.py", "pyproject.toml", "README.md")

EXTERNAL_PATHS = {
    "tools/preprocess_data.py",  # Megatron-LM's preprocessing script, which the preprocessing benchmark compares with
    "docs/s",  # not a path: documents per second
}
OPTIONAL_MODULES = {
    "megatron_bliss._C",  # the C++/CUDA extension, built from csrc/ when a compiler is there; PyTorch fallback else
}
FILE_EXTS = {"py", "json", "jsonl", "md", "yaml", "yml", "npy", "png", "txt", "sh", "bin", "idx", "gz", "model",
             "parquet", "so", "cpp", "cu", "h", "toml", "log", "pt", "csv"}

_FENCE_RE = re.compile(r"[ \t]*(```+|~~~+)[ \t]*([\w+-]*)")
_SPAN_RE = re.compile(r"`([^`]+)`")
_LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
_TOP_DIRS_RE = "|".join(re.escape(d) for d in TOP_DIRS)
_TOP_FILES_RE = "|".join(re.escape(f) for f in TOP_FILES)
_PATH_RE = re.compile(  # a top-level directory and what follows it (globs, {a,b}), or a top-level file
    r"(?<![\w./$~{}-])((?:" + _TOP_DIRS_RE + r")/(?:[\w.*+/-]|\{[^{}\s]*\})*|(?:" + _TOP_FILES_RE + r")(?![\w.-]))")
_MODULE_RE = re.compile(r"(?<![\w-])-m\s+(megatron_bliss(?:\.\w+)*)")
_NAME_RE = re.compile(r"(?<![\w.])(megatron_bliss(?:\.\w+)+)(?![\w/])")  # not a format tag (``NAME/1``)
_STAGE_RE = re.compile(r"(?<![\w-])megatron-bliss[ \t]+([a-z][\w-]*)")
_KEY_RE = re.compile(r"(?<![\w./$-])(--)?([a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_*]+)+)(?!\.?[\w*/])")


@dataclasses.dataclass(frozen=True)
class Problem:
    where: str
    token: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.token}: {self.why}"


# ----------------------------------------------------------------------------------------------- config keys


def _dataclass_of(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


@functools.lru_cache(maxsize=1)
def config_keys() -> tuple[frozenset, frozenset, frozenset]:
    """(sections, keys, nested): the section names of the roots, every dotted key below them, and the keys (and
    sections) whose type is itself a dataclass."""
    sections, keys, nested = set(), set(), set()

    def walk(cls, prefix, seen):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}.{f.name}"
            keys.add(path)
            sub = _dataclass_of(hints[f.name])
            if sub is not None and sub not in seen:
                nested.add(path)
                walk(sub, path, seen | {sub})

    def load(spec):
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)

    for spec in ROOT_CONFIGS:
        root = load(spec)
        hints = typing.get_type_hints(root)
        for f in dataclasses.fields(root):
            sub = _dataclass_of(hints[f.name])
            if sub is not None:
                sections.add(f.name)
                nested.add(f.name)
                walk(sub, f.name, {sub})
    for section, spec in STAGE_SECTIONS:
        sections.add(section)
        nested.add(section)
        walk(load(spec), section, {load(spec)})
    return frozenset(sections), frozenset(keys), frozenset(nested)


def _is_key(token: str) -> bool:
    _, keys, _ = config_keys()
    if "*" in token:
        return any(fnmatch.fnmatchcase(k, token) for k in keys)
    return token in keys


# ------------------------------------------------------------------------------------- modules, names, stages


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _module_problem(name: str) -> str | None:
    spec = _find_spec(name)
    if spec is None:
        return "no such module"
    if spec.submodule_search_locations is not None and _find_spec(name + ".__main__") is None:
        return "a package without __main__ cannot run with -m"
    return None


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or a module's attribute (chain)."""
    if dotted in OPTIONAL_MODULES:
        return True
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if _find_spec(module) is None:
            continue
        if i == len(parts):
            return True
        try:
            obj = importlib.import_module(module)
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
        except ImportError:  # an optional dependency is missing: what is behind it cannot be looked at here
            return True
        return True
    return False


@functools.lru_cache(maxsize=1)
def _stages() -> frozenset:
    from megatron_bliss.cli import STAGES

    return frozenset(STAGES)


# ----------------------------------------------------------------------------------------------------- paths


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def _path_exists(path: str, base: str) -> bool:
    for p in _expand_braces(path):
        full = os.path.join(base, p)
        if any(c in p for c in "*?["):
            if not glob.glob(full):
                return False
        elif not os.path.exists(full):
            return False
    return True


# -------------------------------------------------------------------------------------------------- scanning


class _Scan:
    """Collects the problems of one text, with 1-based line numbers from offsets into it."""

    def __init__(self, text: str, name: str, doc_dir: str):
        self.text, self.name, self.doc_dir = text, name, doc_dir
        self.problems: list[Problem] = []
        self.counts = dict.fromkeys(("paths", "links", "modules", "names", "stages", "keys"), 0)

    def line(self, offset: int) -> int:
        return self.text.count("\n", 0, offset) + 1

    def report(self, offset: int, token: str, why: str) -> None:
        self.problems.append(Problem(f"{self.name}:{self.line(offset)}", token, why))

    def paths(self, offset: int, segment: str) -> None:
        for m in _PATH_RE.finditer(segment):
            path = m.group(1).rstrip(".-")
            self.counts["paths"] += 1
            if path not in EXTERNAL_PATHS and not _path_exists(path, REPO_ROOT):
                self.report(offset + m.start(1), path, "no such file in the repository")

    def links(self, offset: int, segment: str) -> None:
        for m in _LINK_RE.finditer(segment):
            target = m.group(1).strip("<>")
            if re.match(r"[A-Za-z][\w+.-]*:", target) or target.startswith(("#", "/")):
                continue
            target = target.split("#", 1)[0]
            self.counts["links"] += 1
            if target and not _path_exists(target, os.path.join(REPO_ROOT, self.doc_dir)):
                self.report(offset + m.start(1), m.group(1),
                            f"link target does not exist (relative to {self.doc_dir or '.'}/)")

    def code(self, offset: int, segment: str) -> None:
        """Modules, stages, names and config keys: only where the text is code (or a command in a comment)."""
        module_starts = set()
        for m in _MODULE_RE.finditer(segment):
            module_starts.add(m.start(1))
            self.counts["modules"] += 1
            why = _module_problem(m.group(1))
            if why:
                self.report(offset + m.start(1), m.group(1), why)
        for m in _NAME_RE.finditer(segment):
            if m.start(1) in module_starts:
                continue
            self.counts["names"] += 1
            if not _resolves(m.group(1)):
                self.report(offset + m.start(1), m.group(1), "no such module or attribute")
        for m in _STAGE_RE.finditer(segment):
            self.counts["stages"] += 1
            if m.group(1) not in _stages():
                self.report(offset + m.start(1), f"megatron-bliss {m.group(1)}",
                            f"no such stage (megatron_bliss.cli.STAGES: {', '.join(sorted(_stages()))})")
        sections = config_keys()[0]
        for m in _KEY_RE.finditer(segment):
            dashed, token = bool(m.group(1)), m.group(2)
            if token.split(".", 1)[0] not in sections:
                continue
            self.counts["keys"] += 1
            if _is_key(token):
                continue
            if dashed:
                self.report(offset + m.start(2), "--" + token, "no such config key")
            elif token.rsplit(".", 1)[1] not in FILE_EXTS and not _resolves("megatron_bliss." + token):
                self.report(offset + m.start(2), token, "no such config key (nor a name in megatron_bliss)")

    def yaml_block(self, offset: int, block: str) -> None:
        """A YAML block whose top-level keys are all config sections: each key must exist."""
        sections, keys, nested = config_keys()
        try:
            node = yaml.compose(block)
        except yaml.YAMLError:
            return
        if not isinstance(node, yaml.MappingNode) or not node.value:
            return
        if not all(isinstance(k, yaml.ScalarNode) and k.value in sections for k, _ in node.value):
            return
        first = self.line(offset)

        def walk(path, value):
            if not isinstance(value, yaml.MappingNode):
                return
            for k, v in value.value:
                key = f"{path}.{k.value}"
                self.counts["keys"] += 1
                if key not in keys:
                    self.problems.append(Problem(f"{self.name}:{first + k.start_mark.line}", key, "no such config key"))
                elif key in nested:
                    walk(key, v)

        for k, v in node.value:
            walk(k.value, v)


def _markdown_segments(text: str):
    """Yields (offset, text, kind) of a markdown text; kind: 'code' (fenced block or inline code), 'yaml' (a
    fenced YAML block) or 'prose' (the rest, inline code blanked out so that offsets stay)."""
    offset, fence, lang, block_start, prose_start = 0, None, "", 0, 0

    def inline(start, end):
        chunk = text[start:end]
        masked = list(chunk)
        for m in _SPAN_RE.finditer(chunk):
            if "\n\n" in m.group(1):
                continue
            yield start + m.start(1), m.group(1), "code"
            masked[m.start():m.end()] = " " * (m.end() - m.start())
        yield start, "".join(masked), "prose"

    for line in text.splitlines(keepends=True):
        m = _FENCE_RE.match(line)
        if fence is None and m:
            yield from inline(prose_start, offset)
            fence, lang, block_start = m.group(1), m.group(2).lower(), offset + len(line)
        elif fence is not None and line.strip() == fence:
            yield block_start, text[block_start:offset], "yaml" if lang in ("yaml", "yml") else "code"
            fence, prose_start = None, offset + len(line)
        offset += len(line)
    if fence is not None:
        yield block_start, text[block_start:], "code"
    else:
        yield from inline(prose_start, len(text))


def _yaml_comment_segments(text: str):
    offset = 0
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith("#"):
            yield offset + len(line) - len(stripped), stripped
        elif " #" in line:
            i = line.index(" #")
            yield offset + i, line[i:]
        offset += len(line)


def scan(text: str, name: str, kind: str | None = None) -> _Scan:
    """Scans ``text`` as the file ``name`` (relative to the repository root; links resolve from its directory).
    ``kind``: 'markdown', 'script' (all of it is code) or 'config' (a YAML config: its comments are code); by
    default from the file name."""
    if kind is None:
        kind = "markdown" if name.endswith(".md") else "config" if name.endswith((".yaml", ".yml")) else "script"
    s = _Scan(text, name, os.path.dirname(name))
    if kind == "markdown":
        for offset, segment, what in _markdown_segments(text):
            s.paths(offset, segment)
            if what == "prose":
                s.links(offset, segment)
            else:
                s.code(offset, segment)
            if what == "yaml":
                s.yaml_block(offset, segment)
    elif kind == "config":
        for offset, segment in _yaml_comment_segments(text):
            s.paths(offset, segment)
            s.code(offset, segment)
    else:
        s.paths(0, text)
        s.code(0, text)
    return s


def scanned_files() -> list[str]:
    def rel(pattern):
        return sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, pattern)))

    return ["README.md", *rel("docs/*.md"), "bench/README.md", "tests/assets/PROVENANCE.md",
            *rel("examples/*.sh"), *rel("examples/*.sbatch"), *rel("examples/configs/*.yaml")]


# ----------------------------------------------------------------------------------------------------- tests


def test_docs_name_only_what_exists():
    problems, counts = [], dict.fromkeys(("paths", "links", "modules", "names", "stages", "keys"), 0)
    for name in scanned_files():
        with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
            s = scan(f.read(), name)
        problems += s.problems
        for k, v in s.counts.items():
            counts[k] += v
    assert not problems, f"{len(problems)} bad references in the docs:\n" + "\n".join(map(str, problems))
    # the extractor found what the docs certainly hold (a scan that finds nothing would pass vacuously)
    assert all(counts[k] > 0 for k in counts), counts


_SAMPLE = """\
Run `python tools/no_such_tool.py --input data/c4/part.json.gz` or
`torchrun -m megatron_bliss.pipeline --config examples/configs/bliss_tiny_cpu.yaml --bilevel.no_such_key=1`
(outputs: runs/x/report.md, /shared/runs/y). See [the page](no_such_page.md) and [bilevel](bilevel.md), and
`tests/assets/c4_sample/*.json.gz`, `tests/assets/c4_sample/c4-train.0000{0,1}-of-00002.json.gz`, `tests/nothing/*.gz`.

```bash
python -m megatron_bliss.no_such_stage --run.method=random --paths.save_dir=/shared/runs/a
megatron-bliss nope --config c4/en/x.yaml
megatron-bliss pretrain --config tok/x.yaml
```

`scoring.chunk_size`, `steps.eval_branch_*`, `scoring.json`, `data.subsets.write_subset`, `selection.nothing`,
`tokenizer.model`, `megatron_bliss.nope`, `megatron_bliss.data.subsets`

```yaml
bilevel:
  outer_steps: 3
  no_key: 1
```

```yaml
task: sciq
dataset_path: json
```
"""


def test_extractor_reports_bad_paths_keys_modules_and_stages():
    s = scan(_SAMPLE, "docs/sample.md")
    got = {(p.where, p.token) for p in s.problems}
    assert got == {
        ("docs/sample.md:1", "tools/no_such_tool.py"),
        ("docs/sample.md:2", "--bilevel.no_such_key"),
        ("docs/sample.md:3", "no_such_page.md"),
        ("docs/sample.md:4", "tests/nothing/*.gz"),
        ("docs/sample.md:7", "megatron_bliss.no_such_stage"),
        ("docs/sample.md:8", "megatron-bliss nope"),
        ("docs/sample.md:12", "selection.nothing"),
        ("docs/sample.md:13", "megatron_bliss.nope"),
        ("docs/sample.md:18", "bilevel.no_key"),
    }, "\n".join(map(str, s.problems))
    assert "data/c4" not in str(s.problems) and "runs/" not in str(s.problems)


def test_extractor_in_scripts_and_config_comments():
    script = ("bash scripts/nope.sh\n# see docs/nope.md\n"
              "torchrun -m megatron_bliss.pretrain --train.nope=1 --paths.valid_prefix=\"$out/data/lambada\"\n")
    assert [(p.where, p.token) for p in scan(script, "examples/x.sh").problems] == [
        ("examples/x.sh:1", "scripts/nope.sh"), ("examples/x.sh:2", "docs/nope.md"),
        ("examples/x.sh:3", "--train.nope")]
    config = "# --schedule.nope=1, tools/train_tokenizer.py\ntrain:\n  micro_batch_size: 4   # see docs/nope.md\n"
    assert [(p.where, p.token) for p in scan(config, "examples/configs/x.yaml").problems] == [
        ("examples/configs/x.yaml:1", "--schedule.nope"), ("examples/configs/x.yaml:3", "docs/nope.md")]
