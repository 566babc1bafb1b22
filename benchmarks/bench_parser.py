r"""Parser time on adversarial completions: is :func:`bcr.task.parsing.parse_completion` linear?

    python benchmarks/bench_parser.py [--sizes 16000,64000,256000,1000000] [--budget 5] [--repeats 3] [--timeout 60] [--json out.json]

Each *family* builds a completion of a given size (characters) that stresses one part of the
parser; the table shows the parse time per family and size. A parser linear in its input shows
times growing ~4x per 4x size; a quadratic one ~16x. Target: every completion <= 1 MB in <= 0.2 s.
Once a family takes longer than ``--budget`` seconds at one size, its larger sizes are skipped;
with ``--timeout`` each case runs in a child process killed after that many seconds, so the script
also finishes against a quadratic (or worse) parser.

Families:

- ``spaces``: one line of spaces; ``tabs_label``: ``**Answer`` followed by a run of tabs and spaces
  (the label pattern); ``header_spaces``: ``### `` followed by spaces (the header pattern);
- ``unclosed_boxes``: ``\boxed{`` repeated, never closed; ``nested_braces``: one ``\boxed{`` around
  deeply nested ``{{{...}}}``; ``nested_boxes``: ``\boxed{\boxed{...}}`` nested thousands deep;
  ``unbalanced_braces``: ``\boxed{`` + ``{`` runs, closed once;
- ``labels``: thousands of ``Answer k: \boxed{k}`` lines (N = 64); ``labels_one_line``: the same on
  one line; ``headers``: thousands of ``### Problem k`` headers with work and answers (N = 64);
- ``unicode``: random code points (all planes, newlines included);
- ``structured``: random fragments of the answer format (headers, labels, boxes, braces, think
  tags, whitespace runs), N = 8, truncated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import random
import sys
import time
from collections.abc import Callable

from bcr.task.parsing import parse_completion

FRAGMENTS = [
    "### Problem 1", "### Problem 2", "### Problem 7", "Problem 3:", "**Problem 4:**", "\n", "\n\n", " ",
    "    ", "\t\t", "Answer 1:", "Answer 2:", "Answer 8:", "Answer:", "**Answer 5:**", "\\boxed{",
    "\\boxed{3}", "\\boxed", "\\fbox{", "{", "}", "\\{", "\\}", "\\frac{1}{2}", "$", "$$", "\\(", "\\)",
    "<think>", "42", "-7", "x", "π", "答案", "é", "**", "：", "Final Answer 3:", "#",
    "Problem", "1", ".", "The answer is 12.", "so x = 5", "Answer to Problem 6:",
]


def _repeat(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def spaces(size: int) -> tuple[str, int]:
    return " " * size, 2


def tabs_label(size: int) -> tuple[str, int]:
    return "**Answer" + _repeat(" \t", size) + "x", 2


def header_spaces(size: int) -> tuple[str, int]:
    return "### " + " " * size + "x", 2


def unclosed_boxes(size: int) -> tuple[str, int]:
    return _repeat("\\boxed{", size), 2


def nested_braces(size: int) -> tuple[str, int]:
    depth = size // 2
    return "Answer 1: \\boxed{" + "{" * depth + "1" + "}" * depth + "}", 1


def nested_boxes(size: int) -> tuple[str, int]:
    depth = size // 8
    return "\\boxed{" * depth + "1" + "}" * depth, 1


def unbalanced_braces(size: int) -> tuple[str, int]:
    return "\\boxed{" + _repeat("{x", size) + "}", 1


def labels(size: int) -> tuple[str, int]:
    lines, total, k = [], 0, 0
    while total < size:
        line = f"Answer {k % 64 + 1}: \\boxed{{{k}}}\n"
        lines.append(line)
        total += len(line)
        k += 1
    return "".join(lines)[:size], 64


def labels_one_line(size: int) -> tuple[str, int]:
    text, _ = labels(size)
    return text.replace("\n", " "), 64


def headers(size: int) -> tuple[str, int]:
    parts, total, k = [], 0, 0
    while total < size:
        part = f"### Problem {k % 64 + 1}\nWe add {k} and 1 to get {k + 1}.\nAnswer {k % 64 + 1}: \\boxed{{{k + 1}}}\n\n"
        parts.append(part)
        total += len(part)
        k += 1
    return "".join(parts)[:size], 64


def unicode(size: int, seed: int = 0) -> tuple[str, int]:
    rng = random.Random(seed)
    chars = []
    for _ in range(size):
        c = rng.randrange(0x110000)
        if 0xD800 <= c <= 0xDFFF:  # surrogates are not text
            c = 0x20
        chars.append(chr(c) if rng.random() < 0.9 else rng.choice("\n {}\\#*:"))
    return "".join(chars), 4


def structured(size: int, seed: int = 0) -> tuple[str, int]:
    rng = random.Random(seed)
    parts, total = [], 0
    while total < size:
        f = rng.choice(FRAGMENTS)
        if rng.random() < 0.01:
            f = rng.choice(" \t") * rng.randint(10, 2000)  # repetition loops
        parts.append(f)
        total += len(f)
    return "".join(parts)[:size], 8


FAMILIES: dict[str, Callable[[int], tuple[str, int]]] = {
    "spaces": spaces,
    "tabs_label": tabs_label,
    "header_spaces": header_spaces,
    "unclosed_boxes": unclosed_boxes,
    "nested_braces": nested_braces,
    "nested_boxes": nested_boxes,
    "unbalanced_braces": unbalanced_braces,
    "labels": labels,
    "labels_one_line": labels_one_line,
    "headers": headers,
    "unicode": unicode,
    "structured": structured,
}


def time_parse(text: str, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        parse_completion(text, n, truncated=True)
        best = min(best, time.perf_counter() - t0)
    return best


def _child(name: str, size: int, repeats: int, out) -> None:
    text, n = FAMILIES[name](size)
    out.put(time_parse(text, n, repeats))


def time_isolated(name: str, size: int, repeats: int, timeout: float) -> float | None:
    """Time one case in a forked child killed after ``timeout`` s (None): a quadratic parser can
    take hours on the largest cases."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, size, repeats, out))
    proc.start()
    try:
        return out.get(timeout=timeout)
    except queue.Empty:
        return None
    finally:
        proc.kill()
        proc.join()


def run(
    sizes: list[int], budget: float, families: list[str], repeats: int, timeout: float | None = None
) -> dict[str, dict[int, float | None]]:
    results: dict[str, dict[int, float | None]] = {}
    for name in families:
        row: dict[int, float | None] = {}
        over = False
        for size in sizes:
            if over:
                row[size] = None
                continue
            reps = repeats if size <= 100_000 else 1
            if timeout is None:
                text, n = FAMILIES[name](size)
                seconds = time_parse(text, n, reps)
            else:
                seconds = time_isolated(name, size, reps, timeout)
            row[size] = seconds
            over = seconds is None or seconds > budget
            shown = f"{seconds:9.4f} s" if seconds is not None else f"> {timeout:g} s (killed)"
            print(f"  {name:18s} {size:>9,d} chars  {shown}", file=sys.stderr, flush=True)
        results[name] = row
    return results


def table(results: dict[str, dict[int, float | None]], sizes: list[int], budget: float) -> str:
    head = "| family | " + " | ".join(f"{s:,d} chars" for s in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[s]:.4f} s" if row[s] is not None else "skipped / killed" for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16000,64000,256000,1000000", help="comma-separated sizes in characters")
    ap.add_argument("--budget", type=float, default=5.0, help="skip a family's larger sizes once it takes longer")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs for sizes <= 100,000")
    ap.add_argument("--timeout", type=float, default=None,
                    help="run each case in a child process killed after this many seconds")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    results = run(sizes, args.budget, families, args.repeats, args.timeout)
    print(table(results, sizes, args.budget))
    worst = max((t for row in results.values() for t in row.values() if t is not None), default=0.0)
    print(f"\nslowest parse: {worst:.4f} s (target <= 0.2 s for <= 1 MB)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({name: {str(s): t for s, t in row.items()} for name, row in results.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
