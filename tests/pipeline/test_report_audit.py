"""The report's selection audit on hand-built run directories (no training): real preprocessed shards of the shipped
C4 sample, fake scores and selections for several methods over the same shards, then the Markdown and JSON."""

import json
import os
import re

import numpy as np
import pytest
from scipy.stats import spearmanr

from megatron_bliss.data.origins import Span
from tests.conftest import REPO_ROOT, preprocess_sample

TOKENIZER = os.path.join(REPO_ROOT, "megatron_bliss", "data", "assets", "default_bpe_8k.model")
ROUNDS = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_data")
    preprocess_sample(str(out / "c4"), 65, 3)
    return [str(out / f"c4_shard{k}") for k in range(3)]


def _num_sequences(prefix: str) -> int:
    from megatron_bliss.data.sequences import read_sequences

    return len(read_sequences(prefix))


def _write_run(run_dir, method: str, shard_list: list, rounds: dict) -> None:
    """A run directory as the pipeline leaves it after its rounds: config.yaml, manifest.json and, per round,
    ``rounds[r] = (scores or None, selected indices, previous_model scores or None)``."""
    from megatron_bliss.config import dump
    from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig, RunSection
    from megatron_bliss.pipeline.manifest import Manifest

    cfg = PipelineRunConfig(run=RunSection(method=method, rounds=ROUNDS))
    paths = PipelinePaths(run_dir=str(run_dir), shards=list(shard_list), valid_prefix=shard_list[0])
    manifest = Manifest(str(run_dir), f"hash-{method}")
    dump(cfg, os.path.join(run_dir, "config.yaml"), paths=paths)
    for r, (scores, indices, previous) in rounds.items():
        d = run_dir / f"round{r}"
        (d / "scores").mkdir(parents=True, exist_ok=True)
        if scores is not None:
            np.save(d / "scores" / "scores.npy", np.asarray(scores, np.float32))
        if previous is not None:
            np.save(d / "scores" / "previous_model.npy", np.asarray(previous, np.float32))
        np.save(d / "subset.indices.npy", np.sort(np.asarray(indices, np.int64)))
        manifest.mark_done(f"round{r}/select", info={"kind": "selection", "seconds": 1.0, "flops": 1e9})
        manifest.mark_done(f"round{r}/eval", info={"kind": "eval", "seconds": 2.0, "flops": 2e9,
                                                   "val_loss": 6.0 - r})


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-scores, kind="stable")[:k])


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """bliss (with previous_model.npy in round 2), dsir with the same ranking (2 * bliss + 1, the same top-k),
    cosine with independent scores, random, and a 'scores' run whose rounds read the shards in the other order."""
    base = tmp_path_factory.mktemp("audit_runs")
    rng = np.random.default_rng(0)
    n = {r: _num_sequences(shards[r]) for r in range(1, ROUNDS + 1)}
    data = {m: {} for m in ("bliss", "dsir", "cosine", "random", "scores")}
    for r in range(1, ROUNDS + 1):
        k = n[r] // 4
        bliss = rng.normal(size=n[r]).astype(np.float32)
        previous = None
        if r >= 2:
            half = n[r] // 2
            previous = bliss[:half] + rng.normal(scale=0.7, size=half).astype(np.float32)
        cosine = rng.normal(size=n[r]).astype(np.float32)
        data["bliss"][r] = (bliss, _top(bliss, k), previous)
        data["dsir"][r] = (2 * bliss + 1, _top(2 * bliss + 1, k), None)
        data["cosine"][r] = (cosine, _top(cosine, k), None)
        data["random"][r] = (None, np.sort(rng.choice(n[r], k, replace=False)), None)
    swapped = [shards[0], shards[2], shards[1]]
    for r in range(1, ROUNDS + 1):
        own = rng.normal(size=_num_sequences(swapped[r])).astype(np.float32)
        data["scores"][r] = (own, _top(own, len(own) // 4), None)
    dirs = {}
    for method, rounds in data.items():
        dirs[method] = base / method
        _write_run(dirs[method], method, swapped if method == "scores" else shards, rounds)
    return dirs, data


# ------------------------------------------------------------------------------------------- Markdown parsing
def _section(md: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of the same or a higher level."""
    lines = md.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start + 1:end])


def _tables(text: str) -> list:
    """Each Markdown table in ``text`` as ``(title line, header cells, rows of cells)``; escaped pipes are text."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            title = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            cells = [_cells(lines[i])]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells.append(_cells(lines[i]))
                i += 1
            out.append((title, cells[0], cells[1:]))
        else:
            i += 1
    return out


def _cells(line: str) -> list:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table(text: str, title_start: str):
    found = [t for t in _tables(text) if t[0].startswith(title_start)]
    assert len(found) == 1, (title_start, [t[0] for t in _tables(text)])
    return found[0]


def _matrix(text: str, title_start: str) -> dict:
    _, header, rows = _table(text, title_start)
    return {(row[0], col): value for row in rows for col, value in zip(header[1:], row[1:])}


def _report(runs, out_dir):
    from megatron_bliss.pipeline.report import write_report

    dirs, _ = runs
    md_path = write_report([str(dirs[m]) for m in ("bliss", "dsir", "cosine", "random", "scores")], str(out_dir))
    with open(md_path) as f:
        md = f.read()
    with open(os.path.join(out_dir, "report.json")) as f:
        record = json.load(f)
    return md, record


def _check_plots(md: str, out_dir) -> None:
    named = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) + re.findall(r"\[scores\.png\]\(([^)]+)\)", md)
    assert "scores.png" in named and "val_loss.png" in named
    if "| source | pool tokens |" in md:
        assert any(name.startswith("sources_round") for name in named)
    for name in named:
        assert os.path.isfile(os.path.join(out_dir, name)), name


# ------------------------------------------------------------------------------------------------ the tests
def test_audit_sections_extremes_and_comparisons(runs, shards, tmp_path):
    """Every round and run has its section; the scored runs have 10 decoded highest and lowest sequences; runs on
    the same shard are compared (the same ranking gives 1.000), a run on another shard is not; BLISS's consecutive
    score models are compared."""
    md, record = _report(runs, tmp_path)
    _, data = runs
    assert "## Selection audit" in md
    audit = _section(md, "## Selection audit")
    for r in range(1, ROUNDS + 1):
        rnd = _section(audit, f"### Round {r}")
        assert "[scores.png](scores.png)" in rnd
        for method in ("bliss", "dsir", "cosine", "random", "scores"):
            sec = _section(rnd, f"#### {method}: round {r}")
            scores, indices, _ = data[method][r]
            assert f"{len(indices):,} selected" in sec
            if method == "random":
                assert "No scores (random)" in sec and not [t for t in _tables(sec) if "score" in t[1]]
                continue
            _, header, top = _table(sec, "Highest-scored")
            _, _, bottom = _table(sec, "Lowest-scored")
            assert len(top) == 10 and len(bottom) == 10
            assert header[:4] == ["rank", "sequence", "score", "selected"]
            order = np.argsort(-scores, kind="stable")
            assert [int(row[1]) for row in top] == order[:10].tolist()
            assert [int(row[1]) for row in bottom] == np.argsort(scores, kind="stable")[:10].tolist()
            assert all(row[3] == "yes" for row in top)  # top-k selections keep the highest scores
            assert all(row[5] not in ("", "-") and "\n" not in row[5] for row in top + bottom)
            if method == "bliss" and r >= 2:
                n = len(data["bliss"][r][2])
                rho = spearmanr(data["bliss"][r][2], scores[:n])[0]
                assert (f"Round 1's score model against round 2's on the first {n:,} sequences of this shard: "
                        f"Spearman ρ = {rho:.3f}.") in sec
            else:
                assert "Spearman ρ =" not in sec
        comparison = _section(rnd, f"#### Between runs on shard `{shards[r]}`: round {r}")
        rho = _matrix(comparison, "Spearman")
        overlap = _matrix(comparison, "Overlap")
        jaccard = _matrix(comparison, "Jaccard")
        assert {a for a, _ in rho} == {"bliss", "dsir", "cosine", "random"}  # not 'scores': another shard
        for m in ("bliss", "dsir", "cosine"):
            assert rho[m, m] == "1.000" and overlap[m, m] == "1.000" and jaccard[m, m] == "1.000"
        assert rho["bliss", "dsir"] == rho["dsir", "bliss"] == "1.000"
        assert overlap["bliss", "dsir"] == jaccard["bliss", "dsir"] == "1.000"
        assert rho["bliss", "random"] == rho["random", "random"] == "-"
        expected = spearmanr(data["bliss"][r][0], data["cosine"][r][0])[0]
        assert rho["bliss", "cosine"] == f"{expected:.3f}" != "1.000"
        a, b = data["bliss"][r][1], data["random"][r][1]
        common = len(np.intersect1d(a, b))
        assert overlap["bliss", "random"] == f"{common / len(a):.3f}"
        assert jaccard["random", "bliss"] == f"{common / len(np.union1d(a, b)):.3f}"
    _check_plots(md, tmp_path)
    # the JSON has the same audit
    audit_json = {rnd["round"]: rnd for rnd in record["audit"]}
    assert sorted(audit_json) == list(range(1, ROUNDS + 1))
    entry = next(e for e in audit_json[1]["runs"] if e["label"] == "bliss")
    assert len(entry["highest"]) == 10 and entry["highest"][0]["score"] == pytest.approx(
        float(data["bliss"][1][0].max()))
    assert [c["runs"] for c in audit_json[1]["comparisons"]] == [["bliss", "dsir", "cosine", "random"]]


def test_audit_texts_are_the_shards_decoded_sequences(runs, shards, tmp_path):
    from megatron_bliss.data.sequences import read_sequences
    from megatron_bliss.data.tokenizer import build_tokenizer
    from megatron_bliss.pipeline.report import EOD_MARK, TEXT_CHARS, show_text

    _, record = _report(runs, tmp_path)
    tokenizer = build_tokenizer(TOKENIZER)
    sequences = read_sequences(shards[1])
    entry = next(e for e in record["audit"][0]["runs"] if e["label"] == "dsir")
    for row in entry["highest"] + entry["lowest"]:
        ids = np.asarray(sequences[row["sequence"]])
        pieces = np.split(ids, np.flatnonzero(ids == tokenizer.eod) + 1)
        text = "".join(tokenizer.detokenize(p[p != tokenizer.eod]) + (EOD_MARK if len(p) and p[-1] == tokenizer.eod
                                                                     else "") for p in pieces)
        assert row["text"] == show_text(text)
        assert len(row["text"]) <= TEXT_CHARS + 1 and "\n" not in row["text"]


def _patch_read_origins(monkeypatch, read_origins) -> None:
    """The report's ``read_origins`` replaced on the data package's module."""
    import megatron_bliss.data.origins as module

    monkeypatch.setattr(module, "read_origins", read_origins)


def test_source_table_without_provenance_is_one_line(runs, shards, tmp_path, monkeypatch):
    """No sidecar (read_origins returns None): one line, no table."""
    _patch_read_origins(monkeypatch, lambda prefix: None)
    md, _ = _report(runs, tmp_path / "none")
    sec = _section(_section(md, "### Round 1"), "#### bliss: round 1")
    assert f"No sources: shard `{shards[1]}`: it has no provenance sidecar." in sec
    assert not [t for t in _tables(sec) if t[1] and t[1][0] == "source"]


class _FakeOrigins:
    """The Origins API over a shard: sequence i comes from two documents of source ``host{i % 25}`` (one with a
    url, one a file line without), ``tokens_per_sequence`` tokens in all."""

    def __init__(self, n: int, length: int):
        self.n, self.length = n, length
        self.calls = []

    def __len__(self) -> int:
        return self.n

    def spans(self, sequence: int) -> list:
        host = f"host{sequence % 25}.example"
        half = self.length // 2
        return [Span(f"{host}.json.gz", sequence + 1, f"https://{host}/doc/{sequence}", 0, half, 0),
                Span(f"{host}.json.gz", sequence + 2, None, 0, self.length - half, half)]

    def source_tokens(self, sequences=None) -> dict:
        self.calls.append(None if sequences is None else len(sequences))
        idx = np.arange(self.n) if sequences is None else np.asarray(sequences)
        hosts, counts = np.unique(idx % 25, return_counts=True)
        return {f"host{h}.example": int(c) * self.length for h, c in zip(hosts, counts)}


def test_source_table_and_plot_with_provenance(runs, shards, tmp_path, monkeypatch):
    """Through the Origins API (a fake of it: 25 sources): the 20 with the most selected tokens and one row for the
    rest, shares summing to 100 % in the pool and the selection, a plot, the shown sequences' sources; the pool is
    counted once per shard however many runs read it."""
    from megatron_bliss.data.sequences import read_sequences

    made = {}

    def read_origins(prefix):
        made.setdefault(prefix, _FakeOrigins(*read_sequences(prefix).shape))
        return made[prefix]

    _patch_read_origins(monkeypatch, read_origins)
    md, record = _report(runs, tmp_path)
    _, data = runs
    for r in range(1, ROUNDS + 1):
        rnd = _section(_section(md, "## Selection audit"), f"### Round {r}")
        for method in ("bliss", "random", "scores"):
            sec = _section(rnd, f"#### {method}: round {r}")
            _, header, rows = _table(sec, "Tokens by source")
            assert header[:5] == ["source", "pool tokens", "pool %", "selected tokens", "selected %"]
            assert len(rows) == 21 and rows[-1][0] == "(other 5 sources)"
            assert sum(float(row[2]) for row in rows) == pytest.approx(100, abs=0.05)
            assert sum(float(row[4]) for row in rows) == pytest.approx(100, abs=0.05)
            selected = [int(row[3].replace(",", "")) for row in rows[:-1]]
            assert selected == sorted(selected, reverse=True)
            indices = data[method][r][1]
            assert sum(int(row[3].replace(",", "")) for row in rows) == len(indices) * 65
            assert f"![sources_round{r}_{method}.png](sources_round{r}_{method}.png)" in sec
            if method != "random":
                _, _, top = _table(sec, "Highest-scored")
                seq = int(top[0][1])
                host = f"host{seq % 25}.example"
                assert top[0][4] == f"https://{host}/doc/{seq}, {host}.json.gz:{seq + 2}"
    _check_plots(md, tmp_path)
    # one pool count per shard, one selection count per run and round
    for origins in made.values():
        assert origins.calls.count(None) == 1
    assert record["audit"][0]["runs"][0]["sources"]["num_sources"] == 25


def test_real_provenance_when_the_shards_have_it(runs, shards, tmp_path):
    """With the data package's own provenance reader (when it exists), the shards' sidecars give the table, or each
    shard without one says so in one line."""
    try:
        from megatron_bliss.data.origins import read_origins
    except ImportError:
        pytest.skip("megatron_bliss.data.origins is not in this tree yet")
    md, _ = _report(runs, tmp_path)
    sec = _section(_section(md, "### Round 1"), "#### bliss: round 1")
    if read_origins(shards[1]) is None:
        assert f"No sources: shard `{shards[1]}`: it has no provenance sidecar." in sec
        return
    origins = read_origins(shards[1])
    pool = origins.source_tokens()
    _, data = runs
    selected = origins.source_tokens(data["bliss"][1][1])
    _, _, rows = _table(sec, "Tokens by source")
    assert 1 <= len(rows) <= 21
    assert sum(float(row[4]) for row in rows) == pytest.approx(100, abs=0.05)
    assert sum(float(row[2]) for row in rows) == pytest.approx(100, abs=0.05)
    if len(pool) <= 20:
        assert {row[0].replace("\\", "") for row in rows} == set(pool)
        assert {row[0].replace("\\", ""): int(row[3].replace(",", "")) for row in rows} == {
            name: selected.get(name, 0) for name in pool}
    _, _, top = _table(sec, "Highest-scored")
    for row in top:
        spans = origins.spans(int(row[1]))
        assert row[4].replace("\\", "").startswith(spans[0].url or f"{spans[0].file}:{spans[0].line}")
    _check_plots(md, tmp_path)


def test_cells_and_extremes():
    from megatron_bliss.pipeline.report import extreme_indices, md_cell, show_text

    assert show_text("a\nb\r\nc\td", 200) == "a⏎b⏎c d"
    assert show_text("x" * 250) == "x" * 200 + "…"
    assert md_cell("a|b *c* `d` <e> [f](g) \\") == "a\\|b \\*c\\* \\`d\\` \\<e\\> \\[f\\](g) \\\\"
    assert _cells("| " + md_cell("p|q\\") + " | r |") == ["p\\|q\\\\", "r"]
    scores = np.array([0.5, np.nan, 3.0, -1.0, 3.0, np.inf, 0.0], np.float32)
    top, bottom = extreme_indices(scores, 3)
    assert top.tolist() == [2, 4, 0] and bottom.tolist() == [3, 6, 0]
    top, bottom = extreme_indices(np.arange(5.0), 10)
    assert top.tolist() == [4, 3, 2, 1, 0] and bottom.tolist() == [0, 1, 2, 3, 4]
