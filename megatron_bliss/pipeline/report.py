"""The run report: JSON, Markdown and PNG plots from one or more run directories (e.g. BLISS and its random twin).

    python -m megatron_bliss.pipeline.report RUN_DIR [RUN_DIR ...] --output REPORT_DIR

It reads only what the runs wrote (manifest, metrics.jsonl of each target phase, scores.npy of each round) and
shows: validation loss against target tokens (the main run's periodic validation and each round's evaluation
branch), score histograms per round, and time and FLOPs per phase with the selection share of the total. With two or
more runs it adds the comparison: evaluation-branch loss per round side by side, and how many target tokens each run
needed to reach the last run's final evaluation loss.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import yaml


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
    curve, evals, hists = [], [], {}
    for r in range(rounds + 1):
        for rec in _read_jsonl(os.path.join(run_dir, f"round{r}", "target", "metrics.jsonl")):
            if rec.get("val_loss") is not None:
                curve.append((rec["step"] * tokens_per_step, float(rec["val_loss"])))
        entry = phases.get(f"round{r}/eval")
        if entry and entry["info"].get("val_loss") is not None:
            branch = _read_jsonl(os.path.join(run_dir, f"round{r}", "eval", "metrics.jsonl"))
            step = branch[-1]["step"] if branch else 0
            evals.append({"round": r, "tokens": step * tokens_per_step, "val_loss": float(entry["info"]["val_loss"])})
        scores_path = os.path.join(run_dir, f"round{r}", "scores", "scores.npy")
        if os.path.isfile(scores_path):
            hists[r] = np.load(scores_path).astype(np.float64)
    phase_rows = [{"phase": k, "kind": v["info"].get("kind", ""), "seconds": v["info"].get("seconds", 0.0),
                   "flops": v["info"].get("flops", 0.0)} for k, v in sorted(phases.items(), key=lambda kv:
                                                                             kv[1]["finished"])]
    sel = [p for p in phase_rows if p["kind"] == "selection"]
    total_s = sum(p["seconds"] for p in phase_rows) or 1.0
    total_f = sum(p["flops"] for p in phase_rows) or 1.0
    return {
        "run_dir": run_dir, "method": cfg["run"]["method"], "rounds": rounds, "finished_phases": len(phases),
        "val_curve": sorted(curve), "eval": evals, "scores": hists, "phases": phase_rows,
        "selection_share_time": sum(p["seconds"] for p in sel) / total_s,
        "selection_share_flops": sum(p["flops"] for p in sel) / total_f,
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


def _plots(runs: list, out_dir: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append("val_loss.png")
    fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
    plt.close(fig)
    hist_runs = [run for run in runs if run["scores"]]
    if hist_runs:
        rounds = sorted({r for run in hist_runs for r in run["scores"]})
        fig, axes = plt.subplots(1, len(rounds), figsize=(3.2 * len(rounds), 3), squeeze=False)
        for ax, r in zip(axes[0], rounds):
            for run in hist_runs:
                if r in run["scores"]:
                    ax.hist(run["scores"][r], bins=40, alpha=0.7, label=run["method"])
            ax.set_title(f"round {r} scores (logit)")
        fig.tight_layout()
        files.append("scores.png")
        fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 0.35 * sum(len(r["phases"]) for r in runs) + 1.2))
    labels, secs = [], []
    for run in runs:
        for p in run["phases"]:
            labels.append(f"{run['method']}: {p['phase']}")
            secs.append(p["seconds"])
    ax.barh(labels, secs)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    fig.tight_layout()
    files.append("phases.png")
    fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
    plt.close(fig)
    return files


def _markdown(runs: list, summary: dict, plots: list) -> str:
    lines = ["# BLISS run report", ""]
    for run in runs:
        lines += [f"## {run['method']}: `{run['run_dir']}`", "",
                  f"{run['finished_phases']} phases finished. Selection share: "
                  f"{100 * run['selection_share_time']:.1f} % of wall time, "
                  f"{100 * run['selection_share_flops']:.1f} % of FLOPs (bilevel FLOPs estimated).", "",
                  "| round | eval-branch tokens | eval-branch val loss |", "|---|---|---|"]
        lines += [f"| {e['round']} | {e['tokens']:,} | {e['val_loss']:.4f} |" for e in run["eval"]]
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
        if summary.get("tokens_to_reach"):
            lines += ["", f"Target tokens to reach the last run's ({runs[-1]['method']}) final main-run validation "
                      f"loss {summary['reference_loss']:.4f}:", ""]
            lines += [f"- {m}: {t:,.0f}" if t is not None else f"- {m}: not reached"
                      for m, t in summary["tokens_to_reach"].items()]
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


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
    plots = _plots(runs, out_dir)
    record = {"runs": [{k: v for k, v in r.items() if k != "scores"} |
                       {"score_stats": {str(k): {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}
                                        for k, v in r["scores"].items()}} for r in runs],
              "summary": summary, "plots": plots}
    for name, text in (("report.json", json.dumps(record, indent=1)), ("report.md", _markdown(runs, summary, plots))):
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
