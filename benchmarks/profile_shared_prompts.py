"""Shared prompts, side by side: the training step and the rollout prefill with and without them.

    python -m benchmarks.profile_shared_prompts                      # N = 1, 4, 8 on the CPU (minutes)
    python -m benchmarks.profile_shared_prompts --n-values 1 --repeats 1 --groups 1   # seconds

A BCR prompt holds N problems, so it grows with N while each of its G samples carries a copy of it.
For each N this measures, in one run:

- **step**: ``benchmarks.profile_step``'s ``packed`` variant (the trainer's own update,
  ``shared_prompt=false``: every sample packed as its own ``[prompt, completion]``) against
  ``packed-shared`` (``shared_prompt=true``: each group packed once as ``[prompt, completion 1..G]``),
  each in fresh child processes, alternating, on the same batch: ``--groups`` groups of ``G``
  completions, budget ``--budget-per-problem`` x N, completion lengths as in profile_step. Reported:
  the tokens each processes, step time (median), peak memory growth (median), the speed-up and the
  speed-up divided by the token ratio.
- **prefill**: ``bcr.models.rollout.HFEngine`` on a model of the same shape, ``max_new_tokens=1`` so the call
  is the prompt prefill plus one token, with ``shared_prefill`` off and on, alternating; both must
  give identical generations.

Prompts are GSM8K-length: N problems of ``<data_dir>/gsm8k/test.jsonl`` (``../shared/data`` by
default) rendered with ``bcr.task.prompts.render_prompt`` and counted with a byte-level BPE tokenizer of
8192 tokens trained on those problems (a stand-in for a real model's tokenizer, which this offline
machine does not have). Without the data file the prompts are synthetic with a stated length per
problem (``--tokens-per-problem``). The report says which.

Targets (issue: shared prompts): at N = 8 the step's speed-up >= 0.8x the token ratio, peak memory
not above the unshared step's; at N = 1 not slower than ``packed`` (<= 1.03x its time); prefill
time divided by about G.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from bcr.data.problems import load_problems
from bcr.task.prompts import render_prompt
from bcr.models.rollout import HFEngine
from bcr.models.tiny import build_tokenizer, tiny_model

from . import harness, profile_step
from .harness import MiB

PRESET = "cpu-gsm8k"
DEFAULT_DATA = harness.REPO.parent / "shared" / "data"


def prompt_lengths(n: int, count: int, data_dir: Path, tokens_per_problem: int) -> tuple[list[int], str]:
    """Token lengths of ``count`` N-problem prompts, and where they come from."""
    path = data_dir / "gsm8k" / "test.jsonl"
    if not path.is_file():
        return [40 + tokens_per_problem * n] * count, f"synthetic: 40 + {tokens_per_problem} tokens per problem"
    problems = list(load_problems(str(path), limit=max(64, n * count)))
    tok = build_tokenizer([p.problem for p in problems], vocab_size=8192)
    lengths = [len(tok(render_prompt(problems[i * n:(i + 1) * n], tok), add_special_tokens=False)["input_ids"])
               for i in range(min(count, len(problems) // n))]
    return lengths, f"{path} (N problems per prompt, byte-level BPE of {len(tok)} tokens trained on them)"


def step_spec(variant: str, n: int, lengths: list[int], args) -> dict:
    preset = profile_step.PRESETS[PRESET]
    batch = {
        "num_completions": args.groups * args.group_size,
        "budget": args.budget_per_problem * n,
        "min_completion": preset["batch"]["min_completion"],
        "prompt_len": (min(lengths), max(lengths)),
        "truncated_frac": 0.25,
        "length_dist": "uniform",
        "n_problems": n,
        "vocab_size": preset["model"]["vocab_size"],
        "seed": args.seed,
        "group_size": args.group_size,
    }
    return {"variant": variant, "preset": PRESET, "device": "cpu", "dtype": preset["dtype"], "batch": batch,
            "seed": args.seed, "repeats": 1, "warmup": 1, "threads": args.threads, "chunk_tokens": None,
            "max_tokens_per_row": None, "liger_chunk": 1024, "liger_compiled": None, "trace": None}


def measure_step(n: int, lengths: list[int], args) -> dict:
    runs: dict[str, list[dict]] = {"packed": [], "packed-shared": []}
    for _ in range(args.repeats):  # alternate the variants, one fresh child per measurement
        for variant in runs:
            result = profile_step.run_child(step_spec(variant, n, lengths, args), args.timeout)
            if "error" in result:
                raise SystemExit(f"{variant} at N = {n} failed: {result['error']}")
            runs[variant] += result["runs"]
    stats = profile_step.batch_stats(profile_step.make_batch_spec(**step_spec("packed", n, lengths, args)["batch"]))
    out = {"tokens": {"packed": stats["real_tokens"], "packed-shared": stats["shared_prompt_tokens"]}}
    for variant, rs in runs.items():
        out[variant] = {"time_s": statistics.median(r["time_s"] for r in rs),
                        "growth_bytes": statistics.median(r["growth_bytes"] for r in rs),
                        "losses": [r["loss"] for r in rs]}
    out["token_ratio"] = out["tokens"]["packed"] / out["tokens"]["packed-shared"]
    out["speedup"] = out["packed"]["time_s"] / out["packed-shared"]["time_s"]
    out["speedup_per_token_ratio"] = out["speedup"] / out["token_ratio"]
    out["memory_ratio"] = out["packed-shared"]["growth_bytes"] / max(out["packed"]["growth_bytes"], 1)
    return out


def measure_prefill(n: int, lengths: list[int], args) -> dict:
    """Prefill time of HFEngine with and without shared_prefill on ``--groups`` prompts of G rows."""
    torch.set_num_threads(args.threads)
    cfg = profile_step.PRESETS[PRESET]["model"]
    tok = build_tokenizer(vocab_size=512)
    model = tiny_model(tok, hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                       num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                       intermediate_size=cfg["intermediate_size"]).eval()
    # prompts of the measured lengths: byte-level text of that many tokens (the token count is what matters)
    prompts = []
    for i, length in enumerate(lengths[: args.groups]):
        ids = [(7 * i + 13 * t) % (len(tok) - 8) + 8 for t in range(length)]
        prompts.append(tok.decode(ids))
    times: dict[str, list[float]] = {"own": [], "shared": []}
    outputs = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for key, shared in (("own", False), ("shared", True)):
            engine = HFEngine(model, tok, shared_prefill=shared)
            t0 = time.perf_counter()
            outputs[key] = engine.generate(prompts, num_generations=args.group_size, max_new_tokens=1, seed=0)
            times[key].append(time.perf_counter() - t0)
            outputs[key + "_tokens"] = engine.prefill_tokens
    if outputs["own"] != outputs["shared"]:
        raise SystemExit(f"shared prefill changed the generations at N = {n}")
    own, shared = statistics.median(times["own"][1:]), statistics.median(times["shared"][1:])
    return {"own_s": own, "shared_s": shared, "speedup": own / shared,
            "prefill_tokens": {"own": outputs["own_tokens"], "shared": outputs["shared_tokens"]}}


def markdown(report: dict) -> str:
    lines = [f"# Shared prompts, side by side ({report['device']}, {report['date']})", "",
             f"Prompts: {report['prompt_source']}. G = {report['group_size']}, {report['groups']} groups per step, "
             f"budget {report['budget_per_problem']} x N, {report['threads']} thread(s), medians of "
             f"{report['repeats']} alternating fresh-process runs.", "",
             "| N | prompt tokens | step tokens (own / shared) | token ratio | step s (own / shared) | speed-up | "
             "speed-up / token ratio | step memory (own / shared, MiB) | prefill s (own / shared) | prefill speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        s, p = row["step"], row["prefill"]
        lines.append(
            f"| {row['n']} | {row['prompt_tokens_mean']:.0f} | {s['tokens']['packed']:,} / "
            f"{s['tokens']['packed-shared']:,} | {s['token_ratio']:.2f}x | {s['packed']['time_s']:.2f} / "
            f"{s['packed-shared']['time_s']:.2f} | {s['speedup']:.2f}x | {s['speedup_per_token_ratio']:.2f} | "
            f"{s['packed']['growth_bytes'] / MiB:,.0f} / {s['packed-shared']['growth_bytes'] / MiB:,.0f} | "
            f"{p['own_s']:.3f} / {p['shared_s']:.3f} | {p['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-values", default="1,4,8")
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--groups", type=int, default=2, help="prompts (groups) per step")
    p.add_argument("--budget-per-problem", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BCR_DATA_DIR", DEFAULT_DATA)))
    p.add_argument("--tokens-per-problem", type=int, default=70, help="synthetic prompts only")
    p.add_argument("--out", type=Path, default=harness.RESULTS / "profile_shared_prompts_cpu")
    args = p.parse_args(argv)
    rows, source = [], None
    for n in [int(x) for x in args.n_values.split(",")]:
        lengths, source = prompt_lengths(n, max(args.groups, 8), args.data_dir, args.tokens_per_problem)
        print(f"N = {n}: prompts of {min(lengths)}-{max(lengths)} tokens; step ...", flush=True)
        step = measure_step(n, lengths, args)
        print(f"  step speed-up {step['speedup']:.2f}x at token ratio {step['token_ratio']:.2f}x; prefill ...",
              flush=True)
        prefill = measure_prefill(n, lengths, args)
        rows.append({"n": n, "prompt_tokens_mean": statistics.mean(lengths), "step": step, "prefill": prefill})
    report = {"device": harness.device_name("cpu"), "date": harness.now(), "command": harness.command(
        "benchmarks.profile_shared_prompts", argv), "versions": harness.versions(), "prompt_source": source,
        "group_size": args.group_size, "groups": args.groups, "budget_per_problem": args.budget_per_problem,
        "threads": args.threads, "repeats": args.repeats, "rows": rows}
    md = markdown(report)
    print(md)
    for path in harness.write_report(args.out, report, md):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
