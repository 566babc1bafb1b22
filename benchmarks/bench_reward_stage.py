"""Throughput of the reward stage: parse + verify synthetic N-problem completions.

    python benchmarks/bench_reward_stage.py [--num 10000] [--n-problems 5] [--workers 2] [--json out.json]

Builds ``--num`` completions answering ``--n-problems`` problems each in the requested format
(``### Problem k`` ... ``Answer k: \\boxed{..}``), with typical answers: integers, fractions and
decimals; about 65 % correct (some in an equivalent form, e.g. ``0.5`` for ``\\frac{1}{2}``),
20 % wrong, 10 % missing, 4 % unboxed ``Answer k: 12`` lines, and 1 % symbolic answers that need
math-verify (``2\\sqrt{3}`` vs ``\\sqrt{12}``). Some completions are out of order or restate an answer.
Reports instances/s for parsing alone, parse + verify in one process, and parse + verify over a
process pool (``bcr.rl.rewards.score_completions(workers=...)``). Target: >= 2,000 instances/s per core.
The answers_match cache is cleared before each timed run (pool workers are forked with an empty
cache), so repeated (pred, ref) pairs only hit the cache within a run, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from fractions import Fraction


def make_completions(num: int, n: int, seed: int = 0):
    rng = random.Random(seed)
    texts, refs = [], []
    for _ in range(num):
        answers = []
        order = list(range(1, n + 1))
        if rng.random() < 0.05:
            rng.shuffle(order)
        sections = {}
        for k in range(1, n + 1):
            kind = rng.random()
            if kind < 0.55:
                v = rng.randint(0, 5000)
                ref, good = str(v), str(v)
                wrong = str(v + rng.choice([-1, 1, 10]))
            elif kind < 0.85:
                a, b = rng.randint(1, 40), rng.randint(2, 40)
                f = Fraction(a, b)
                ref = f"\\frac{{{f.numerator}}}{{{f.denominator}}}" if f.denominator != 1 else str(f.numerator)
                good = ref if rng.random() < 0.7 else (f"{f.numerator}/{f.denominator}" if f.denominator != 1 else ref)
                if f.denominator in (2, 4, 5, 8, 10, 20, 25) and rng.random() < 0.5:
                    good = str(float(f))
                wrong = f"\\frac{{{f.numerator + 1}}}{{{f.denominator}}}"
            elif kind < 0.99:
                v = rng.randint(1, 999) / 100
                ref, good, wrong = f"{v:g}", f"{v:g}", f"{v + 0.5:g}"
            else:
                m = rng.randint(2, 9)
                ref, good, wrong = f"{m}\\sqrt{{3}}", f"\\sqrt{{{3 * m * m}}}", f"{m}\\sqrt{{2}}"
            answers.append(ref)
            outcome = rng.random()
            work = f"We compute step by step: {rng.randint(1, 99)} + {rng.randint(1, 99)} and simplify.\n" * rng.randint(1, 4)
            if outcome < 0.65:
                line = f"Answer {k}: \\boxed{{{good}}}"
            elif outcome < 0.85:
                line = f"Answer {k}: \\boxed{{{wrong}}}"
            elif outcome < 0.90:
                line = f"Answer {k}: {good}" if "\\" not in good else f"Answer {k}: ${good}$"
            else:
                line = ""
            sections[k] = f"### Problem {k}\n{work}{line}\n"
        text = "".join(sections[k] for k in order)
        if rng.random() < 0.05:
            text += f"\nTo summarise, Answer 1: \\boxed{{{answers[0]}}}\n"
        texts.append(text)
        refs.append(answers)
    return texts, refs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=10_000)
    ap.add_argument("--n-problems", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)

    from bcr.task.parsing import parse_completion
    from bcr.rl.rewards import score_completions
    from bcr.task.verify import _match_cached, answers_match

    texts, refs = make_completions(args.num, args.n_problems, args.seed)
    inst = args.num * args.n_problems
    answers_match("x+1", "1+x")  # import math-verify / sympy outside the timed runs
    results = {"num_completions": args.num, "n_problems": args.n_problems, "instances": inst,
               "cpu_count": os.cpu_count()}

    t0 = time.perf_counter()
    for t in texts:
        parse_completion(t, args.n_problems)
    dt = time.perf_counter() - t0
    results["parse_only_inst_per_s"] = inst / dt

    _match_cached.cache_clear()
    t0 = time.perf_counter()
    _, r1 = score_completions(texts, args.n_problems, refs, workers=0)
    dt1 = time.perf_counter() - t0
    results["serial_inst_per_s"] = inst / dt1
    results["mean_reward"] = float(r1.mean())

    if args.workers > 0:
        _match_cached.cache_clear()
        score_completions(texts[:8], args.n_problems, refs[:8], workers=args.workers)  # start the pool
        _match_cached.cache_clear()
        from bcr.rl import rewards as _rw

        # workers were forked before this run's cache clear in the parent only; restart them clean
        _rw._POOL.shutdown()
        _rw._POOL = None
        score_completions(texts[:2], args.n_problems, refs[:2], workers=args.workers)
        t0 = time.perf_counter()
        _, r2 = score_completions(texts, args.n_problems, refs, workers=args.workers)
        dt2 = time.perf_counter() - t0
        assert bool((r1 == r2).all()), "pool and serial rewards differ"
        results[f"pool{args.workers}_inst_per_s"] = inst / dt2
        results[f"pool{args.workers}_inst_per_s_per_worker"] = inst / dt2 / args.workers

    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:,.1f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return results


if __name__ == "__main__":
    main()
