"""A run's report: report.html with PNG plots beside it, built from the run's events.jsonl.

Plots: loss and metrics per round, participation per round, bytes received per round, time per
stage. Everything shown is an aggregate the run already logged (never a per-silo value).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from aggregator.artifacts import read_events
from aggregator.errors import AggregatorError
from fedsilo_base.atomic_files import PRIVATE, atomic_path, write_atomic


def _rounds(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last round-finished event of each round (a resumed run may repeat none)."""
    by_round: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.get("event") == "round-finished":
            by_round[int(event["round"])] = event
    return [by_round[r] for r in sorted(by_round)]


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, mode=PRIVATE) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def _series(rounds: list[dict[str, Any]], section: str) -> dict[str, list[float]]:
    keys = sorted({k for r in rounds for k in r.get(section, {})})
    return {k: [float(r.get(section, {}).get(k, float("nan"))) for r in rounds] for k in keys}


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and its PNGs (report-*.png); return the HTML's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    events = read_events(run_dir / "events.jsonl")
    if not events:
        raise AggregatorError(f"{run_dir} holds no run (no events.jsonl); pass a run's out-dir")
    rounds = _rounds(events)
    if not rounds:
        raise AggregatorError(f"run in {run_dir} finished no round yet; nothing to report")
    x = [int(r["round"]) for r in rounds]
    plots: list[tuple[str, str]] = []

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, values in {**_series(rounds, "train"), **_series(rounds, "evaluate")}.items():
        (ax_loss if "loss" in name else ax_metric).plot(x, values, marker="o", label=name)
    for ax, title in ((ax_loss, "loss per round"), (ax_metric, "metrics per round")):
        ax.set_title(title)
        ax.set_xlabel("round")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, run_dir / "report-metrics.png")
    plots.append(("report-metrics.png", "Loss and metrics per round"))

    fig, (ax_part, ax_bytes) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_part.bar(x, [r.get("participants", 0) for r in rounds], label="contributed")
    ax_part.bar(
        x,
        [len(r.get("refused", {})) for r in rounds],
        bottom=[r.get("participants", 0) for r in rounds],
        color="tab:red",
        label="refused",
    )
    ax_part.set_title("participation per round")
    ax_part.set_xlabel("round")
    ax_part.legend(fontsize=8)
    ax_bytes.bar(x, [r.get("bytes_received", 0) / 1e6 for r in rounds], color="tab:green")
    ax_bytes.set_title("MB received per round")
    ax_bytes.set_xlabel("round")
    _save(fig, run_dir / "report-traffic.png")
    plots.append(("report-traffic.png", "Participation and bytes received per round"))

    stages = sorted({k for r in rounds for k in r.get("timings", {})})
    fig, ax = plt.subplots(figsize=(10, 3.6))
    bottom = [0.0] * len(rounds)
    for stage in stages:
        values = [float(r.get("timings", {}).get(stage, 0.0)) for r in rounds]
        ax.bar(x, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_title("seconds per stage, per round")
    ax.set_xlabel("round")
    if stages:
        ax.legend(fontsize=8)
    _save(fig, run_dir / "report-timings.png")
    plots.append(("report-timings.png", "Time per stage"))

    started = next((e for e in events if e["event"] in ("run-started", "run-resumed")), {})
    status = "finished" if any(e["event"] == "run-finished" for e in events) else "not finished"
    failures = [e for e in events if e["event"] in ("run-failed", "round-failed")]
    test = next((e.get("test", {}) for e in events if e["event"] == "test-evaluated"), None)
    privacy_line = f"<p>Differential privacy: {html.escape(_privacy(run_dir, len(rounds)))}.</p>"
    test_line = (
        f"<p>Held-out test splits (final model): {html.escape(_fmt(test))}</p>"
        if test is not None
        else ""
    )
    rows = "".join(
        f"<tr><td>{r['round']}</td><td>{r.get('participants', 0)}</td>"
        f"<td>{html.escape(_fmt(r.get('evaluate', {})))}</td>"
        f"<td>{r.get('bytes_received', 0):,}</td><td>{float(r.get('seconds', 0)):.1f}</td></tr>"
        for r in rounds
    )
    images = "".join(
        f'<figure><img src="{name}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in plots
    )
    problems = "".join(
        f"<li>{html.escape(e['event'])}: {html.escape(str(e.get('reason', '')))}</li>"
        for e in failures
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>fedsilo run {html.escape(str(started.get('run_id', run_dir.name)))}</title>"
        "<style>body{font-family:sans-serif;margin:2em;background:#fff}"
        "img{max-width:100%}td,th{padding:2px 10px;text-align:right}</style></head><body>"
        f"<h1>Run {html.escape(str(started.get('run_id', run_dir.name)))}</h1>"
        f"<p>plan {html.escape(str(started.get('plan_hash', ''))[:16])}, "
        f"aggregation {html.escape(str(started.get('aggregation', '?')))}, "
        f"{len(rounds)} round(s), {status}.</p>"
        + (f"<ul>{problems}</ul>" if problems else "")
        + privacy_line
        + images
        + test_line
        + "<h2>Rounds</h2><table><tr><th>round</th><th>silos</th><th>validation</th>"
        f"<th>bytes in</th><th>seconds</th></tr>{rows}</table></body></html>"
    )
    out = run_dir / "report.html"
    write_atomic(out, page.encode("utf-8"), mode=PRIVATE)
    return out


def _privacy(run_dir: Path, rounds_trained: int) -> str:
    """The run's DP guarantee as its plan states it (the consortium knows nothing more)."""
    from training_plan import load_plan
    from training_plan.errors import PlanError
    from training_plan.privacy import released_guarantee

    for path in (run_dir / "plan.yaml", run_dir / "model" / "plan.yaml"):
        if path.exists():
            try:
                return released_guarantee(load_plan(path), rounds_trained)
            except PlanError as exc:
                return f"unknown (the run's {path.name} does not load: {exc})"
    return "unknown (the run folder holds no plan.yaml)"


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items())) or "-"
