"""`bcr eval` and `bcr solve` on the vLLM engine (``engine=vllm``), end to end through the CLI: at a
temperature low enough to be greedy, vLLM writes the same completions as the HF engine."""

from __future__ import annotations

import json

import pytest

from bcr import cli
from bcr.models.tiny import tiny_model
from bcr.task.synthetic import make_arithmetic_problems

GREEDY = "temperature=1e-6"  # vLLM samples greedily below 1e-5; the HF sampler's softmax is one-hot there
VLLM = ["engine=vllm", "engine_kwargs={kv_cache_gb: 0.5, max_model_len: 256}"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("model")
    tiny_model(tiny_tokenizer, arch="llama", hidden_size=128, num_heads=4, num_kv_heads=2, seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n"
                            for p in make_arithmetic_problems(6, seed=2)))
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bcr_eval_on_vllm_writes_the_hf_engines_completions(tmp_path, model_dir, data):
    runs = {}
    for engine, extra in (("vllm", VLLM), ("hf", ["engine=hf"])):
        out = tmp_path / engine
        assert cli.main(["eval", f"model={model_dir}", f"benchmark={data}", "n_values=[1,2]", "budget_mode=per_problem",
                         "per_problem_budget=12", GREEDY, f"output_dir={out}", "progress=false", "plots=false",
                         "n_bootstrap=50", *extra]) == 0
        runs[engine] = _lines(out / "results.jsonl")
        assert json.loads((out / "eval_config.json").read_text())["engine"] == engine
    assert len(runs["vllm"]) == 6 + 3
    for a, b in zip(runs["vllm"], runs["hf"]):
        assert (a["problem_ids"], a["completion"], a["completion_tokens"]) == (b["problem_ids"], b["completion"],
                                                                               b["completion_tokens"])


def test_bcr_solve_on_vllm_writes_the_hf_engines_answers(tmp_path, model_dir, data):
    outs = {}
    for engine, extra in (("vllm", VLLM), ("hf", ["engine=hf"])):
        outs[engine] = tmp_path / f"{engine}.jsonl"
        assert cli.main(["solve", f"model={model_dir}", f"input={data}", f"output={outs[engine]}", "n=2",
                         "per_problem_budget=12", GREEDY, "progress=false", *extra]) == 0
    vllm, hf = _lines(outs["vllm"]), _lines(outs["hf"])
    assert [r["id"] for r in vllm] == [json.loads(line)["id"] for line in data.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "engine"} for r in vllm] == \
           [{k: v for k, v in r.items() if k != "engine"} for r in hf]


def test_auto_means_vllm_where_it_is_installed(tmp_path, model_dir, tiny_tokenizer):
    """The defaults the engine benchmark chose: the trainer's rollout_engine="auto" and bcr solve's
    engine=auto resolve to vLLM here (it is installed); solve keeps HF for a model object."""
    from bcr.eval.solve import SolveConfig, engine_name
    from bcr.rl.config import BCRConfig

    assert BCRConfig(output_dir=str(tmp_path)).rollout_engine == "vllm"
    cfg = SolveConfig(model=str(model_dir), input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"))
    assert engine_name(str(model_dir), cfg) == "vllm"
    assert engine_name(tiny_model(tiny_tokenizer, arch="llama", hidden_size=128, num_heads=4, seed=0), cfg) == "hf"
