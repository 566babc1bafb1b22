"""The demo's own plot: how often each model answers without work, per difficulty and N.

The sweep's plots (tokens per problem, accuracy, the frontier) come from ``bcr.eval.report``; this
one needs the problems' difficulty, which only the demo's task knows.
"""

from __future__ import annotations

from pathlib import Path

from bcr.eval.report import save_png

LINE_STYLES = ("-", "--", ":", "-.")


def write_adaptive_plot(result: dict, path: str | Path) -> None:
    """Share of problems answered ``direct`` vs N, one colour per model, one line style per difficulty
    (from ``styles_by_difficulty`` of :func:`bcr.demo.summary.demo_summary`)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for i, (name, m) in enumerate(result["models"].items()):
        per_n = m.get("styles_by_difficulty") or []
        labels = list(per_n[0]) if per_n else []
        for j, label in enumerate(labels):
            points = [(n, mix[label]["direct"][0] if mix.get(label) and "direct" in mix[label] else 0.0)
                      for n, mix in zip(m["n"], per_n) if mix.get(label)]
            if points:
                ax.plot([n for n, _ in points], [100 * v for _, v in points], marker="o", color=f"C{i % 10}",
                        linestyle=LINE_STYLES[j % len(LINE_STYLES)], label=f"{name}, {label}")
    ax.set_xlabel("problems per context N")
    ax.set_ylabel("problems answered direct (no work), %")
    ax.set_title("Adaptive reasoning: direct answers by difficulty")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, Path(path))
