"""The run report: JSON, Markdown and PNG plots from one or more run directories (e.g. BLISS and its random twin).

    python -m megatron_bliss.pipeline.report RUN_DIR [RUN_DIR ...] --output REPORT_DIR

It reads only what the runs wrote (manifest, metrics.jsonl of each target phase, scores.npy of each round) and
shows: validation loss against target tokens (the main run's periodic validation and each round's evaluation
branch), score histograms per round, and time and FLOPs per phase with the selection share of the total; for a run
with ``eval.tasks``, each round's lm-evaluation-harness accuracies (per task and their mean) and a plot of the mean
against target tokens. With two or more runs it adds the comparison: evaluation-branch loss (and mean accuracy) per
round side by side, and how many target tokens each run needed to reach the last run's final evaluation loss.

The selection audit (:func:`audit`) adds, per round and run, what was selected from the round's shard
(``paths.shards[r]``): the share of tokens by source (the shard's provenance sidecar, read through
:mod:`megatron_bliss.data.origins`) in the pool and in the selection for the 20 sources with the most selected
tokens; the 10 highest- and 10 lowest-scored sequences, decoded with the shard's tokenizer, with their sources; for
BLISS from round 2 on, the Spearman correlation of the previous round's score model with this round's on the same
sequences (``scores/previous_model.npy``). Between runs whose round-r shard is the same file it gives matrices of the
Spearman correlation of their scores and of the overlap (``|A ∩ B| / |A|``, Jaccard) of their selections. It stays
bounded on shards of millions of sequences: scores and indices are read whole (one number per sequence), sources
are counted by the sidecar's vectorized ``source_tokens``, and only the 20 sequences shown are read and decoded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import warnings

import numpy as np
import yaml

logger = logging.getLogger(__name__)

TOP_SOURCES = 20
"""Sources shown in the audit's table and plot (by selected tokens); the rest are summed in one row."""
EXTREMES = 10
"""Highest- and lowest-scored sequences shown per round and run."""
TEXT_CHARS = 200
"""Characters of a shown sequence's decoded text."""
EOD_MARK = "⟨eod⟩"
"""Where a shown sequence crosses the end of a document."""
_MD_SPECIAL = re.compile(r"([\\`*_|\[\]<>~])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _read_jsonl(path: str) -> list:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return out


def collect_run(run_dir: str) -> dict:
    """Everything the report shows about one run directory."""
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    tokens_per_step = cfg["train"]["global_batch_size"] * cfg["target"]["seq_length"]
    rounds = cfg["run"]["rounds"]
    phases = manifest["phases"]
    curve, evals, accuracy, hists = [], [], [], {}
    for r in range(rounds + 1):
        for rec in _read_jsonl(os.path.join(run_dir, f"round{r}", "target", "metrics.jsonl")):
            if rec.get("val_loss") is not None:
                curve.append((rec["step"] * tokens_per_step, float(rec["val_loss"])))
        entry = phases.get(f"round{r}/eval")
        if entry and entry["info"].get("val_loss") is not None:
            branch = _read_jsonl(os.path.join(run_dir, f"round{r}", "eval", "metrics.jsonl"))
            step = branch[-1]["step"] if branch else 0
            evals.append({"round": r, "tokens": step * tokens_per_step, "val_loss": float(entry["info"]["val_loss"])})
            harness = (phases.get(f"round{r}/lm_eval") or {}).get("info", {}).get("lm_eval")
            if harness:
                accuracy.append({"round": r, "tokens": step * tokens_per_step, "mean": harness["mean"],
                                 "tasks": {task: row.get("value") for task, row in harness["tasks"].items()},
                                 "metrics": {task: row.get("metric") for task, row in harness["tasks"].items()}})
        scores_path = os.path.join(run_dir, f"round{r}", "scores", "scores.npy")
        if os.path.isfile(scores_path):
            hists[r] = np.load(scores_path).astype(np.float32, copy=False)
    phase_rows = [{"phase": k, "kind": v["info"].get("kind", ""), "seconds": v["info"].get("seconds", 0.0),
                   "flops": v["info"].get("flops", 0.0)} for k, v in sorted(phases.items(), key=lambda kv:
                                                                             kv[1]["finished"])]
    sel = [p for p in phase_rows if p["kind"] == "selection"]
    total_s = sum(p["seconds"] for p in phase_rows) or 1.0
    total_f = sum(p["flops"] for p in phase_rows) or 1.0
    shards = (cfg.get("paths") or {}).get("shards") or []
    return {
        "run_dir": run_dir, "method": cfg["run"]["method"], "rounds": rounds, "finished_phases": len(phases),
        "val_curve": sorted(curve), "eval": evals, "accuracy": accuracy, "scores": hists, "phases": phase_rows,
        "selection_share_time": sum(p["seconds"] for p in sel) / total_s,
        "selection_share_flops": sum(p["flops"] for p in sel) / total_f,
        "shards": {r: shards[r] for r in range(min(rounds + 1, len(shards)))},
    }


def tokens_to_reach(curve: list, loss: float) -> float | None:
    """First token count at which a validation curve reaches ``loss`` (linear interpolation); None if never."""
    prev = None
    for tokens, value in curve:
        if value <= loss:
            if prev is None or prev[1] == value:
                return float(tokens)
            t0, v0 = prev
            return float(t0 + (tokens - t0) * (v0 - loss) / (v0 - value))
        prev = (tokens, value)
    return None


# ------------------------------------------------------------------------------------------- the selection audit
def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two equally long score arrays; None when undefined (too short, constant)."""
    from scipy.stats import spearmanr

    if len(a) != len(b) or len(a) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: undefined, shown as "-"
        rho = float(spearmanr(np.asarray(a), np.asarray(b), nan_policy="omit")[0])
    return rho if np.isfinite(rho) else None


def source_shares(pool: dict, selected: dict, top: int = TOP_SOURCES) -> dict:
    """Tokens and shares by source in the pool and the selection: the ``top`` sources with the most selected tokens
    (ties: most pool tokens, then by name), the others summed in ``other`` (None when there are none)."""
    pool_total, sel_total = int(sum(pool.values())), int(sum(selected.values()))
    names = sorted(set(pool) | set(selected), key=lambda s: (-selected.get(s, 0), -pool.get(s, 0), s))

    def row(name: str, pool_tokens: int, sel_tokens: int) -> dict:
        return {"source": name, "pool_tokens": int(pool_tokens), "selected_tokens": int(sel_tokens),
                "pool_share": pool_tokens / pool_total if pool_total else 0.0,
                "selected_share": sel_tokens / sel_total if sel_total else 0.0}

    rows = [row(s, pool.get(s, 0), selected.get(s, 0)) for s in names[:top]]
    rest = names[top:]
    other = (row(f"(other {len(rest)} sources)", sum(pool.get(s, 0) for s in rest),
                 sum(selected.get(s, 0) for s in rest)) if rest else None)
    return {"pool_tokens": pool_total, "selected_tokens": sel_total, "num_sources": len(names), "rows": rows,
            "other": other}


def extreme_indices(scores: np.ndarray, k: int = EXTREMES) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest-scored sequences (best first) and of the ``k`` lowest (worst first), among
    finite scores; ties in index order. Linear time (``np.argpartition``), whatever the number of sequences."""
    finite = np.isfinite(scores)
    where = None if finite.all() else np.flatnonzero(finite)
    values = scores if where is None else scores[where]
    n = len(values)
    k = min(k, n)
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = np.argpartition(values, n - k)[n - k:]
    top = top[np.lexsort((top, -values[top].astype(np.float64)))]
    bottom = np.argpartition(values, k - 1)[:k]
    bottom = bottom[np.lexsort((bottom, values[bottom]))]
    if where is not None:
        top, bottom = where[top], where[bottom]
    return top.astype(np.int64), bottom.astype(np.int64)


def show_text(text: str, limit: int = TEXT_CHARS) -> str:
    """The first ``limit`` characters of ``text`` on one line: newlines shown as ⏎, other control characters as
    spaces (an ellipsis marks a cut)."""
    cut = text[:limit]
    cut = cut.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")
    return _CONTROL.sub(" ", cut.replace("\t", " ")) + ("…" if len(text) > limit else "")


def md_cell(text: str) -> str:
    """``text`` escaped for one Markdown table cell (pipes, emphasis, code, links and HTML brackets)."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def _span_sources(spans: list, most: int = 3) -> str:
    """A sequence's sources: each span's url, or file:line without one (the first ``most``; then how many more)."""
    names = []
    for span in spans:
        name = span.url or f"{span.file}:{span.line}"
        if name not in names:
            names.append(name)
    return ", ".join(names[:most]) + (f" +{len(names) - most} more" if len(names) > most else "")


class _Shards:
    """What the runs on one shard share, read once per report: its provenance, its pool's sources, its tokenizer."""

    def __init__(self) -> None:
        self._origins: dict = {}
        self._pool: dict = {}
        self._tokenizers: dict = {}

    def origins(self, prefix: str) -> tuple:
        """``(Origins or None, why none)`` of the shard at ``prefix``."""
        key = os.path.realpath(prefix)
        if key not in self._origins:
            from megatron_bliss.data.origins import read_origins

            try:
                origins = read_origins(prefix)
            except (OSError, ValueError) as exc:
                self._origins[key] = (None, f"its provenance sidecar cannot be read ({exc})")
            else:
                self._origins[key] = (origins, "" if origins is not None else "it has no provenance sidecar")
        return self._origins[key]

    def pool_sources(self, prefix: str, origins) -> dict:
        key = os.path.realpath(prefix)
        if key not in self._pool:
            self._pool[key] = origins.source_tokens()
        return self._pool[key]

    def decode(self, prefix: str, indices: np.ndarray) -> tuple:
        """``(texts or None, why none)``: the decoded sequences ``indices`` of the shard (only those are read)."""
        from megatron_bliss.data.provenance import tokenizer_record

        key = os.path.realpath(prefix)
        if key not in self._tokenizers:
            record = tokenizer_record(prefix) or {}
            path = record.get("path")
            if path and not os.path.isabs(path) and not os.path.exists(path) and record.get("manifest"):
                path = os.path.join(os.path.dirname(record["manifest"]), path)
            if not path:
                self._tokenizers[key] = (None, "no manifest of the shard names its tokenizer")
            elif not os.path.exists(path):
                self._tokenizers[key] = (None, f"its tokenizer {path} is not on this machine")
            else:
                from megatron_bliss.data.tokenizer import build_tokenizer

                self._tokenizers[key] = (build_tokenizer(path), "")
        tokenizer, why = self._tokenizers[key]
        if tokenizer is None:
            return None, why
        from megatron_bliss.data.sequences import read_sequences

        sequences = read_sequences(prefix)
        texts = []
        for i in indices:
            ids = np.asarray(sequences[int(i)])
            ends = np.flatnonzero(ids == tokenizer.eod)
            pieces, start = [], 0
            for end in ends:
                pieces.append(tokenizer.detokenize(ids[start:end]) + EOD_MARK)
                start = end + 1
            pieces.append(tokenizer.detokenize(ids[start:]) if start < len(ids) else "")
            texts.append("".join(pieces))
        return texts, ""


def _audit_entry(run: dict, r: int, shards: _Shards) -> tuple[dict, np.ndarray | None]:
    """One run's audit of round ``r``, and its selected indices (None without a subset)."""
    prefix = run["shards"].get(r)
    entry: dict = {"round": r, "label": run["label"], "method": run["method"], "shard": prefix, "notes": [],
                   "sources": None}
    subset_path = os.path.join(run["run_dir"], f"round{r}", "subset.indices.npy")
    indices = np.load(subset_path).astype(np.int64, copy=False) if os.path.isfile(subset_path) else None
    scores = run["scores"].get(r)
    entry["selected"] = None if indices is None else int(len(indices))
    entry["sequences"] = None if scores is None else int(len(scores))
    if entry["sequences"] is None and prefix and os.path.isfile(prefix + ".idx"):
        from megatron_bliss.data.indexed import IndexedReader

        entry["sequences"] = len(IndexedReader.open(prefix))  # the index only (memory-mapped)
    if indices is None:
        entry["notes"].append(f"no selection (round{r}/subset.indices.npy) yet")
    if prefix is None:
        entry["sources_note"] = "the run's config names no shard for this round: no sources, no texts"
        return entry, indices
    try:
        # 1. tokens by source, pool vs selection
        origins, why = shards.origins(prefix)
        if origins is None:
            entry["sources_note"] = f"No sources: shard `{prefix}`: {why}."
        elif indices is None:
            entry["sources_note"] = "No sources: no selection yet."
        else:
            entry["sources"] = source_shares(shards.pool_sources(prefix, origins), origins.source_tokens(indices))
        # 2. the highest- and lowest-scored sequences
        if scores is not None:
            top, bottom = extreme_indices(scores)
            shown = np.concatenate([top, bottom])
            texts, why = shards.decode(prefix, shown)
            if texts is None:
                entry["decode_note"] = f"Texts not decoded: {why}."
            chosen = np.isin(shown, indices) if indices is not None else [None] * len(shown)
            rows = []
            for j, i in enumerate(shown):
                sources = None
                if origins is not None and i < len(origins):
                    sources = _span_sources(origins.spans(int(i)))
                rows.append({"sequence": int(i), "score": float(scores[i]),
                             "selected": None if chosen[j] is None else bool(chosen[j]), "sources": sources,
                             "text": None if texts is None else show_text(texts[j])})
            entry["highest"], entry["lowest"] = rows[:len(top)], rows[len(top):]
        # 5. this round's score model against the previous round's, on the same sequences
        previous = os.path.join(run["run_dir"], f"round{r}", "scores", "previous_model.npy")
        if scores is not None and os.path.isfile(previous):
            prev = np.load(previous, mmap_mode="r")
            n = min(len(prev), len(scores))
            entry["previous_round"] = {"round": r - 1, "sequences": int(n),
                                       "spearman": _spearman(np.asarray(prev[:n], np.float64), scores[:n])}
    except Exception as exc:  # noqa: BLE001 - a report shows what it can; the pipeline's last step must not fail
        logger.warning("selection audit of %s round %d: %s", run["run_dir"], r, exc, exc_info=True)
        entry["notes"].append(f"audit incomplete: {type(exc).__name__}: {exc}")
    return entry, indices


def _shard_key(prefix: str) -> str:
    return os.path.realpath(prefix + ".bin" if os.path.exists(prefix + ".bin") else prefix)


def compare_on_shard(labels: list, scores: list, selections: list) -> dict:
    """Matrices between the runs on one shard: ``spearman[i][j]`` of their scores, ``overlap[i][j]`` =
    ``|A_i ∩ A_j| / |A_i|`` and ``jaccard[i][j]`` of their selections (None where a run has no scores or no
    selection, or the lengths differ). Selections are ascending index arrays."""
    m = len(labels)
    spearman = [[None] * m for _ in range(m)]
    overlap = [[None] * m for _ in range(m)]
    jaccard = [[None] * m for _ in range(m)]
    for i in range(m):
        for j in range(i, m):
            a, b = scores[i], scores[j]
            if a is not None and b is not None and len(a) == len(b):
                if i == j:  # 1 unless the scores are constant (then undefined)
                    finite = a[np.isfinite(a)]
                    rho = 1.0 if finite.size > 1 and finite.max() > finite.min() else None
                else:
                    rho = _spearman(a, b)
                spearman[i][j] = spearman[j][i] = rho
            sa, sb = selections[i], selections[j]
            if sa is not None and sb is not None:
                common = len(np.intersect1d(sa, sb, assume_unique=True))
                union = len(sa) + len(sb) - common
                overlap[i][j] = common / len(sa) if len(sa) else None
                overlap[j][i] = common / len(sb) if len(sb) else None
                jaccard[i][j] = jaccard[j][i] = common / union if union else None
    return {"runs": labels, "spearman": spearman, "overlap": overlap, "jaccard": jaccard}


def audit(runs: list) -> list:
    """The selection audit of every round: ``[{"round", "runs": [per-run entry], "comparisons": [per shard]}]``.

    Each run needs ``label`` (unique) besides :func:`collect_run`'s keys."""
    shards = _Shards()
    out = []
    rounds = sorted({r for run in runs for r in range(1, run["rounds"] + 1)})
    for r in rounds:
        entries, groups = [], {}
        for run in runs:
            if r > run["rounds"] or not (run["scores"].get(r) is not None or os.path.isfile(
                    os.path.join(run["run_dir"], f"round{r}", "subset.indices.npy"))):
                continue
            entry, indices = _audit_entry(run, r, shards)
            entries.append(entry)
            if entry["shard"]:
                groups.setdefault(_shard_key(entry["shard"]), []).append((run, indices))
        if not entries:
            continue
        comparisons = []
        for key, members in groups.items():
            if len(members) > 1:
                comparison = compare_on_shard([run["label"] for run, _ in members],
                                              [run["scores"].get(r) for run, _ in members],
                                              [indices for _, indices in members])
                sizes = [e["sequences"] for e in entries if e["shard"] and _shard_key(e["shard"]) == key]
                comparison["sequences"] = next((n for n in sizes if n), None)
                comparisons.append({"shard": members[0][0]["shards"][r], **comparison})
        out.append({"round": r, "runs": entries, "comparisons": comparisons})
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_dir: str, name: str, files: list) -> None:
    """Writes a finished figure as ``out_dir/name`` and lists it in ``files``."""
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    files.append(name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _labels(runs: list) -> list:
    """A unique name per run: its method, with its directory's name where methods repeat (and a count after)."""
    methods = [run["method"] for run in runs]
    labels = [m if methods.count(m) == 1 else f"{m} ({os.path.basename(os.path.normpath(run['run_dir']))})"
              for m, run in zip(methods, runs)]
    seen: dict = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def _audit_plots(rounds: list, out_dir: str) -> list:
    """One bar plot per round and run of the token shares by source, pool vs selection; sets each entry's
    ``sources_plot``."""
    plt = _pyplot()
    files = []
    for rnd in rounds:
        for entry in rnd["runs"]:
            table = entry.get("sources")
            if not table or not table["rows"]:
                continue
            rows = table["rows"] + ([table["other"]] if table["other"] else [])
            names = [row["source"] if len(row["source"]) <= 40 else row["source"][:39] + "…" for row in rows]
            y = np.arange(len(rows))
            fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.4))
            ax.barh(y - 0.2, [100 * row["pool_share"] for row in rows], height=0.4, label="pool (whole shard)")
            ax.barh(y + 0.2, [100 * row["selected_share"] for row in rows], height=0.4, label="selection")
            ax.set_yticks(y, names)
            ax.invert_yaxis()
            ax.set_xlabel("share of tokens (%)")
            ax.set_title(f"{entry['label']}: round {rnd['round']} tokens by source")
            ax.legend()
            ax.grid(alpha=0.3, axis="x")
            name = f"sources_round{rnd['round']}_{_slug(entry['label'])}.png"
            _save(plt, fig, out_dir, name, files)
            entry["sources_plot"] = name
    return files


def _plots(runs: list, out_dir: str) -> list:
    plt = _pyplot()
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run["val_curve"]:
            t, v = zip(*run["val_curve"])
            line, = ax.plot(t, v, label=f"{run['method']} (main run)")
            if run["eval"]:
                ax.plot([e["tokens"] for e in run["eval"]], [e["val_loss"] for e in run["eval"]], "o--",
                        color=line.get_color(), label=f"{run['method']} (eval branch)")
    ax.set_xlabel("target training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    _save(plt, fig, out_dir, "val_loss.png", files)
    acc_runs = [run for run in runs if any(a["mean"] is not None for a in run["accuracy"])]
    if acc_runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in acc_runs:
            points = [(a["tokens"], 100 * a["mean"]) for a in run["accuracy"] if a["mean"] is not None]
            ax.plot(*zip(*points), "o-", label=run.get("label", run["method"]))
        ax.set_xlabel("target training tokens")
        ax.set_ylabel("mean accuracy over eval.tasks (%)")
        ax.legend()
        ax.grid(alpha=0.3)
        _save(plt, fig, out_dir, "accuracy.png", files)
    hist_runs = [run for run in runs if run["scores"]]
    if hist_runs:
        rounds = sorted({r for run in hist_runs for r in run["scores"]})
        fig, axes = plt.subplots(1, len(rounds), figsize=(3.2 * len(rounds), 3), squeeze=False)
        for ax, r in zip(axes[0], rounds):
            for run in hist_runs:
                values = run["scores"].get(r)
                if values is not None and np.isfinite(values).any():
                    ax.hist(values[np.isfinite(values)], bins=40, alpha=0.5, label=run.get("label", run["method"]))
            ax.set_title(f"round {r} scores")
            ax.legend(fontsize="small")
        _save(plt, fig, out_dir, "scores.png", files)
    fig, ax = plt.subplots(figsize=(7, 0.35 * sum(len(r["phases"]) for r in runs) + 1.2))
    labels, secs = [], []
    for run in runs:
        for p in run["phases"]:
            labels.append(f"{run['method']}: {p['phase']}")
            secs.append(p["seconds"])
    ax.barh(labels, secs)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    _save(plt, fig, out_dir, "phases.png", files)
    return files


def _markdown(runs: list, summary: dict, plots: list, audit_rounds: list = ()) -> str:
    lines = ["# BLISS run report", ""]
    for run in runs:
        lines += [f"## {run['method']}: `{run['run_dir']}`", "",
                  f"{run['finished_phases']} phases finished. Selection share: "
                  f"{100 * run['selection_share_time']:.1f} % of wall time, "
                  f"{100 * run['selection_share_flops']:.1f} % of FLOPs (bilevel FLOPs estimated).", "",
                  "| round | eval-branch tokens | eval-branch val loss |", "|---|---|---|"]
        lines += [f"| {e['round']} | {e['tokens']:,} | {e['val_loss']:.4f} |" for e in run["eval"]]
        lines += _accuracy_table(run["accuracy"])
        lines += ["", "| phase | kind | seconds | FLOPs |", "|---|---|---|---|"]
        lines += [f"| {p['phase']} | {p['kind']} | {p['seconds']:.1f} | {p['flops']:.3g} |" for p in run["phases"]]
        lines.append("")
    if len(runs) > 1:
        lines += ["## Comparison", "", "| round | " + " | ".join(r["method"] for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        rounds = sorted({e["round"] for r in runs for e in r["eval"]})
        for rd in rounds:
            vals = [next((f"{e['val_loss']:.4f}" for e in r["eval"] if e["round"] == rd), "-") for r in runs]
            lines.append(f"| {rd} | " + " | ".join(vals) + " |")
        acc_rounds = sorted({a["round"] for r in runs for a in r["accuracy"]})
        if acc_rounds:
            lines += ["", "Mean lm-evaluation-harness accuracy (%) of each round's evaluation branch:", "",
                      "| round | " + " | ".join(r["method"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
            for rd in acc_rounds:
                vals = [next((_pct(a["mean"]) for a in r["accuracy"] if a["round"] == rd), "-") for r in runs]
                lines.append(f"| {rd} | " + " | ".join(vals) + " |")
        if summary.get("tokens_to_reach"):
            lines += ["", f"Target tokens to reach the last run's ({runs[-1]['method']}) final main-run validation "
                      f"loss {summary['reference_loss']:.4f}:", ""]
            lines += [f"- {m}: {t:,.0f}" if t is not None else f"- {m}: not reached"
                      for m, t in summary["tokens_to_reach"].items()]
        lines.append("")
    lines += _audit_markdown(audit_rounds, "scores.png" in plots)
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _accuracy_table(accuracy: list) -> list:
    """One run's harness accuracies (%): a row per round, a column per task (its reported metric) and the mean."""
    if not accuracy:
        return []
    tasks = list(dict.fromkeys(task for a in accuracy for task in a["tasks"]))
    metrics = {task: next(a["metrics"][task] for a in accuracy if task in a["metrics"]) for task in tasks}
    lines = ["", "| round | eval-branch tokens | " + " | ".join(f"{t} ({metrics[t]})" for t in tasks) + " | mean |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for a in accuracy:
        cells = [_pct(a["tasks"].get(task)) for task in tasks]
        lines.append(f"| {a['round']} | {a['tokens']:,} | " + " | ".join(cells) + f" | {_pct(a['mean'])} |")
    return lines


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _matrix(title: str, labels: list, values: list) -> list:
    lines = [title, "", "| | " + " | ".join(md_cell(x) for x in labels) + " |", "|---|" + "---|" * len(labels)]
    lines += [f"| {md_cell(label)} | " + " | ".join(_fmt(v) for v in row) + " |" for label, row in zip(labels, values)]
    return lines + [""]


def _extremes_table(title: str, rows: list) -> list:
    lines = [title, "", f"| rank | sequence | score | selected | source | text (first {TEXT_CHARS} characters) |",
             "|---|---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        selected = "-" if row["selected"] is None else ("yes" if row["selected"] else "no")
        text = "-" if row["text"] is None else md_cell(row["text"])
        sources = "-" if row["sources"] is None else md_cell(row["sources"])
        lines.append(f"| {rank} | {row['sequence']} | {row['score']:.4g} | {selected} | {sources} | {text} |")
    return lines + [""]


def _audit_markdown(rounds: list, histograms: bool) -> list:
    """The Markdown of the selection audit (:func:`audit`)."""
    if not rounds:
        return []
    lines = ["## Selection audit", "",
             f"Per round and run: the share of tokens by source in the round's shard (pool) and in the selection, for "
             f"the {TOP_SOURCES} sources with the most selected tokens; the {EXTREMES} highest- and {EXTREMES} "
             f"lowest-scored sequences, decoded ({EOD_MARK} marks a document's end, ⏎ a newline); between runs on "
             "the same shard, how their scores and selections agree.", ""]
    for rnd in rounds:
        r = rnd["round"]
        lines += [f"### Round {r}", ""]
        if histograms:
            lines += [f"Score histograms of every run: [scores.png](scores.png), panel \"round {r} scores\".", ""]
        for e in rnd["runs"]:
            lines += [f"#### {e['label']}: round {r}", ""]
            shard = f"Shard `{e['shard']}`" if e["shard"] else "No shard"
            counts = []
            if e["sequences"] is not None:
                counts.append(f"{e['sequences']:,} sequences" + (" scored" if "highest" in e else ""))
            if e["selected"] is not None:
                share = f" ({100 * e['selected'] / e['sequences']:.1f} %)" if e["sequences"] else ""
                counts.append(f"{e['selected']:,} selected{share}")
            lines += [shard + (": " + ", ".join(counts) if counts else "") + ".", ""]
            lines += [f"{note[0].upper()}{note[1:]}." for note in e["notes"]] + ([""] if e["notes"] else [])
            table = e.get("sources")
            if table is None:
                lines += [e.get("sources_note", "No sources."), ""]
            else:
                lines += [f"Tokens by source: {table['num_sources']:,} sources, {table['pool_tokens']:,} tokens in "
                          f"the pool, {table['selected_tokens']:,} selected.", "",
                          "| source | pool tokens | pool % | selected tokens | selected % | selected / pool |",
                          "|---|---|---|---|---|---|"]
                for row in table["rows"] + ([table["other"]] if table["other"] else []):
                    ratio = row["selected_share"] / row["pool_share"] if row["pool_share"] else None
                    lines.append(f"| {md_cell(row['source'])} | {row['pool_tokens']:,} | "
                                 f"{100 * row['pool_share']:.2f} | {row['selected_tokens']:,} | "
                                 f"{100 * row['selected_share']:.2f} | {_fmt(ratio, '.2f')} |")
                lines.append("")
                if e.get("sources_plot"):
                    lines += [f"![{e['sources_plot']}]({e['sources_plot']})", ""]
            if "highest" in e:
                if e.get("decode_note"):
                    lines += [e["decode_note"], ""]
                lines += _extremes_table("Highest-scored sequences:", e["highest"])
                lines += _extremes_table("Lowest-scored sequences:", e["lowest"])
            else:
                lines += [f"No scores ({e['method']}): no highest- or lowest-scored sequences.", ""]
            prev = e.get("previous_round")
            if prev:
                lines += [f"Round {prev['round']}'s score model against round {r}'s on the first "
                          f"{prev['sequences']:,} sequences of this shard: Spearman ρ = {_fmt(prev['spearman'])}.",
                          ""]
        for c in rnd["comparisons"]:
            lines += [f"#### Between runs on shard `{c['shard']}`: round {r}", ""]
            lines += _matrix("Spearman ρ of the scores:", c["runs"], c["spearman"])
            lines += _matrix("Overlap of the selections, \\|A ∩ B\\| / \\|A\\| (row A, column B):", c["runs"],
                             c["overlap"])
            sizes = [e["selected"] for label in c["runs"] for e in rnd["runs"] if e["label"] == label]
            if c.get("sequences") and all(k is not None for k in sizes):
                lines += ["By chance (a selection independent of A), the overlap with column B is about \\|B\\| / N: "
                          + ", ".join(f"{md_cell(label)} {k / c['sequences']:.3f}"
                                      for label, k in zip(c["runs"], sizes)) + f" (N = {c['sequences']:,}).", ""]
            lines += _matrix("Jaccard index of the selections, \\|A ∩ B\\| / \\|A ∪ B\\|:", c["runs"], c["jaccard"])
    return lines


def _stats(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean(dtype=np.float64)) if finite.size else None,
            "std": float(finite.std(dtype=np.float64)) if finite.size else None, "n": int(values.size)}


def write_report(run_dirs: list, out_dir: str) -> str:
    """Writes ``report.json``, ``report.md`` and PNG plots to ``out_dir`` (atomically per file); returns report.md."""
    runs = [collect_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    summary: dict = {}
    ref = runs[-1]
    if len(runs) > 1 and ref["val_curve"]:
        summary["reference_loss"] = ref["val_curve"][-1][1]
        summary["tokens_to_reach"] = {r["method"]: tokens_to_reach(r["val_curve"], summary["reference_loss"])
                                      for r in runs}
    for run, label in zip(runs, _labels(runs)):
        run["label"] = label
    plots = _plots(runs, out_dir)
    audit_rounds = audit(runs)
    audit_plots = _audit_plots(audit_rounds, out_dir)
    record = {"runs": [{k: v for k, v in r.items() if k != "scores"} |
                       {"score_stats": {str(k): _stats(v) for k, v in r["scores"].items()}} for r in runs],
              "summary": summary, "plots": plots + audit_plots, "audit": audit_rounds}
    for name, text in (("report.json", json.dumps(record, indent=1)),
                       ("report.md", _markdown(runs, summary, plots, audit_rounds))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
    return os.path.join(out_dir, "report.md")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Report of one or more BLISS run directories.")
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--output", required=True, help="report directory")
    args = parser.parse_args(argv)
    print(write_report(args.run_dirs, args.output))  # noqa: T201 - the command's result


if __name__ == "__main__":
    main()
