"""bcr.models.served against a small stub HTTP server in this process (no vLLM needed): the ways a server
can fail - nothing listening, a malformed answer, 503s, a timeout - each give one clear line and leave
nothing half written; retries back off; the concurrency limit holds; a server that returns no token ids
gets bcr's own tokenisation. The real server (``vllm serve``) is tested in tests/with_vllm/test_served.py."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="the served-model client needs openai: pip install 'bcr[served]'")

from bcr import cli  # noqa: E402
from bcr.models.served import ServedEngine, ServedModelError, is_served, served_name  # noqa: E402
from bcr.task.synthetic import make_arithmetic_problems  # noqa: E402

COMPLETION = "### Problem 1\n1 + 1 = 2\nAnswer 1: \\boxed{2}"


class Stub(ThreadingHTTPServer):
    """``GET /v1/models`` lists one model (its ``root`` the tokenizer directory); ``POST`` answers with
    ``self.answer(index, body) -> (status, body text)`` after ``self.delay`` seconds, counting requests and
    the most in flight at once."""

    daemon_threads = True

    def __init__(self, root: Path, context: int = 256):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.context, self.delay = str(root), context, 0.0
        self.answer = None  # set by the fixture
        self.posts, self.in_flight, self.most_in_flight = [], 0, 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, text: str):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        server = self.server
        self._send(200, json.dumps({"object": "list", "data": [
            {"id": "stub", "object": "model", "root": server.root, "max_model_len": server.context}]}))

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            index = len(server.posts)
            server.posts.append(body)
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
        try:
            time.sleep(server.delay)
            status, text = server.answer(index, body)
            self._send(status, text)
        finally:
            with server.lock:
                server.in_flight -= 1


def _completion(body, tokenizer, *, ids=False, completion_tokens=None):
    """A completions response as vLLM shapes it, its usage counted with ``tokenizer`` (``completion_tokens``:
    another count); ``ids``: with vLLM's token ids."""
    completion_ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
    choice = {"index": 0, "text": COMPLETION, "finish_reason": "stop", "logprobs": None}
    if ids:
        choice.update(token_ids=completion_ids, prompt_token_ids=prompt_ids)
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens or len(completion_ids)}
    return {"id": "cmpl-1", "object": "text_completion", "model": "stub", "choices": [choice], "usage": usage}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from bcr.models.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("served") / "tokenizer"
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def stub(tokenizer_dir):
    from bcr.models.loading import load_tokenizer

    server = Stub(tokenizer_dir)
    server.tokenizer = load_tokenizer(tokenizer_dir)
    server.answer = lambda index, body: (200, json.dumps(_completion(body, server.tokenizer)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problems_file(tmp_path, count=4):
    rows = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in make_arithmetic_problems(count, seed=1)]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_urls_are_served_models():
    assert is_served("http://127.0.0.1:8000/v1") and is_served("HTTPS://host/v1")
    assert not is_served("/models/qwen") and not is_served("Qwen/Qwen2.5-0.5B") and not is_served(None)
    assert served_name("http://127.0.0.1:8000/v1") == "127.0.0.1:8000"


def test_nothing_listening_is_one_line_and_nothing_written(tmp_path, capsys):
    """bcr eval and bcr solve against a port nobody listens on: status 1, one line, no files."""
    url = f"http://127.0.0.1:{_free_port()}/v1"
    problems = _problems_file(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["eval", f"model={url}", f"benchmark={problems}", f"output_dir={out}", "progress=false"]) == 1
    (line,) = _error_lines(capsys)
    assert "cannot reach the model server at" in line and url in line
    assert cli.main(["solve", f"model={url}", f"input={problems}", f"output={tmp_path / 'a.jsonl'}",
                     "progress=false"]) == 1
    (line,) = _error_lines(capsys)
    assert "cannot reach the model server at" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["problems.jsonl"]


def test_malformed_response_is_one_line_and_no_record(stub, tmp_path, capsys):
    """A 200 answer that is not JSON stops bcr eval with one line; results.jsonl holds no record."""
    stub.answer = lambda index, body: (200, "{'choices': [not json")
    out = tmp_path / "run"
    argv = ["eval", f"model={stub.url}", f"benchmark={_problems_file(tmp_path)}", f"output_dir={out}",
            "n_values=[1]", "max_completion_length=8", "progress=false", "plots=false"]
    assert cli.main(argv) == 1
    (line,) = _error_lines(capsys)
    assert f"malformed response from {stub.url} to POST /completions: not a JSON object" in line
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").read_text() == ""
    # valid JSON of the wrong shape is malformed too
    stub.answer = lambda index, body: (200, json.dumps({"choices": []}))
    with pytest.raises(ServedModelError, match="malformed response .* is it an OpenAI-compatible server"):
        ServedEngine(stub.url, verbose=False).generate(["x"], num_generations=1, max_new_tokens=4)


def test_503_is_retried_with_backoff_then_succeeds(stub, tokenizer_dir):
    stub.answer = lambda index, body: (503, '{"error": {"message": "busy"}}') if index < 2 else (
        200, json.dumps(_completion(body, stub.tokenizer)))
    engine = ServedEngine(stub.url, max_retries=3, verbose=False)
    started = time.perf_counter()
    (gens,) = engine.generate(["1 + 1?"], num_generations=1, max_new_tokens=16)
    waited = time.perf_counter() - started
    assert len(stub.posts) == 3 and gens[0].text == COMPLETION
    assert waited >= 0.9  # two waits of the openai client's backoff: 0.5 s, then 1 s, less up to 25 % jitter
    # with fewer retries than failures it gives up with one line naming the status
    stub.posts.clear()
    engine = ServedEngine(stub.url, max_retries=1, verbose=False)
    with pytest.raises(ServedModelError, match=r"refused POST /completions: HTTP 503: busy"):
        engine.generate(["1 + 1?"], num_generations=1, max_new_tokens=16)
    assert len(stub.posts) == 2


def test_timeout_is_one_line(stub):
    stub.delay = 2.0
    engine = ServedEngine(stub.url, timeout=0.3, max_retries=0, verbose=False)
    started = time.perf_counter()
    with pytest.raises(ServedModelError, match=r"did not answer POST /completions within 0.3 s \(1 try\)"):
        engine.generate(["1 + 1?"], num_generations=1, max_new_tokens=16)
    assert time.perf_counter() - started < 1.5


def test_concurrency_limit_holds(stub):
    stub.delay = 0.3
    engine = ServedEngine(stub.url, max_concurrency=3, verbose=False)
    out = engine.generate([f"problem {i}" for i in range(4)], num_generations=2, max_new_tokens=8, seed=5)
    assert [len(g) for g in out] == [2, 2, 2, 2] and len(stub.posts) == 8
    assert stub.most_in_flight == 3
    # one request per sample, each with its own seed, the same on every run
    seeds = [p["seed"] for p in stub.posts]
    assert len(set(seeds)) == 8
    stub.posts.clear()
    engine.generate([f"problem {i}" for i in range(4)], num_generations=2, max_new_tokens=8, seed=5)
    assert sorted(p["seed"] for p in stub.posts) == sorted(seeds)


def test_token_ids_from_the_server_or_from_bcr(stub):
    """vLLM's ids are used as they come; without ids bcr tokenises the text (EOS added: the server stopped)."""
    engine = ServedEngine(stub.url, verbose=False)
    tok = engine.tokenizer
    stub.answer = lambda index, body: (200, json.dumps(_completion(body, tok, ids=True)))
    (with_ids,), = engine.generate(["What is 1 + 1?"], num_generations=1, max_new_tokens=16)
    stub.answer = lambda index, body: (200, json.dumps(_completion(body, tok)))
    (without,), = engine.generate(["What is 1 + 1?"], num_generations=1, max_new_tokens=16)
    stub.answer = lambda index, body: (200, json.dumps(_completion(body, tok, completion_tokens=3)))
    with pytest.warns(UserWarning, match="counted 3 completion tokens where bcr's tokenizer counts"):
        engine.generate(["What is 1 + 1?"], num_generations=1, max_new_tokens=16)
    expected = tok(COMPLETION, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert with_ids.completion_ids == without.completion_ids == expected
    assert with_ids.prompt_ids == without.prompt_ids == tok("What is 1 + 1?", add_special_tokens=False)["input_ids"]
    assert with_ids.text == without.text == COMPLETION and not with_ids.truncated
    body = stub.posts[-1]
    assert body["return_token_ids"] is True and body["add_special_tokens"] is False and body["n"] == 1


def test_budget_fitted_to_the_context_and_printed(stub, capsys):
    stub.context = 64
    engine = ServedEngine(stub.url)
    assert engine.context_length == 64
    prompt = "What is 1 + 1?"
    n_prompt = len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    engine.generate([prompt], num_generations=1, max_new_tokens=1000)
    assert stub.posts[-1]["max_tokens"] == 64 - n_prompt
    err = capsys.readouterr().err
    assert "context 64 tokens (max_model_len reported by the server)" in err
    assert f"a prompt of {n_prompt} tokens gets {64 - n_prompt} new tokens instead of 1000" in err
    with pytest.raises(ValueError, match="leaves no room for an answer"):
        engine.generate(["1 + 1 " * 100], num_generations=1, max_new_tokens=8)


def test_a_served_model_cannot_be_trained(stub):
    with pytest.raises(NotImplementedError, match="cannot be trained"):
        ServedEngine(stub.url, verbose=False).sync_weights(object())


def test_missing_client_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openai", None)  # as if openai were not installed
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ImportError, match=r"pip install 'bcr\[served\]'"):
        ServedEngine(url)
    argv = ["eval", f"model={url}", f"benchmark={_problems_file(tmp_path)}", f"output_dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 2
    (line,) = _error_lines(capsys)
    assert "needs the openai client" in line
