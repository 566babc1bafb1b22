"""Several SFT gates side by side: direct accuracy on easy problems and worked accuracy on hard ones.

Reads the ``sft_gate.json`` that :mod:`benchmarks.sft_gate` writes into ``<run>/sft_gate/`` for each
run given as ``<run dir>:<label>`` and draws one group of bars per run at one N: the accuracy of the
direct answers to one-operation problems and of the worked solutions to two-operation problems (the
two halves of the gate), the gate's thresholds as lines, and each bar's number of answers.

    python -m benchmarks.plot_gates docs/sft_gates.png runs/mix:1 runs/mix2:2 --n 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: the gate of issue 27: (difficulty, style, least accuracy)
HALVES = (("1 op", "direct", 0.60, "direct answers, 1 operation"), ("2 ops", "steps", 0.90, "worked, 2 operations"))


def gate_cells(path: Path, n: int) -> list[tuple[float, int]]:
    """``[(accuracy, answers), ...]`` of each half of :data:`HALVES` in one ``sft_gate.json`` (0, 0 when absent)."""
    by_n = json.loads(path.read_text())["by_n"]
    if str(n) not in by_n:
        raise SystemExit(f"{path}: no N = {n} (it has N = {', '.join(by_n)})")
    per = by_n[str(n)]
    return [tuple(per.get(label, {}).get(style, [0.0, 0.0, 0])[1:]) for label, style, _, _ in HALVES]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("runs", nargs="+", help="<run dir>:<label>, one per gate")
    ap.add_argument("--n", type=int, default=1, help="problems per prompt of the gate to draw")
    ap.add_argument("--title", default=None, help="the plot's title")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [spec.rsplit(":", 1) if ":" in spec else (spec, Path(spec).name) for spec in args.runs]
    cells = [gate_cells(Path(run) / "sft_gate" / "sft_gate.json", args.n) for run, _ in runs]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(runs), 3.6))
    width = 0.38
    for k, (_, _, need, name) in enumerate(HALVES):
        xs = [i + (k - 0.5) * width for i in range(len(runs))]
        bars = ax.bar(xs, [100 * c[k][0] for c in cells], width, label=name, color=f"C{k}")
        ax.hlines(100 * need, xs[0] - width / 2, xs[-1] + width / 2, colors=f"C{k}", linestyles="--", linewidth=1)
        for bar, c in zip(bars, cells):
            ax.annotate(f"{c[k][1]}", (bar.get_x() + width / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(runs)), [label for _, label in runs])
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy % (numbers: answers)")
    ax.set_title(args.title or f"SFT gate at N = {args.n} (dashed: the gate)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
