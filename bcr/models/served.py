"""A deployed model behind an OpenAI-compatible server as a rollout engine for ``bcr eval`` and ``bcr solve``.

vLLM (``vllm serve``), SGLang and llama.cpp's ``llama-server`` all speak the OpenAI HTTP API. Point bcr at
one with a URL where a model path would go::

    bcr eval model=http://127.0.0.1:8000/v1 benchmark=gsm8k n_values=[1,2,4]
    bcr solve model=http://127.0.0.1:8000/v1 input=problems.jsonl n=4 'engine_kwargs={max_concurrency: 16}'

What is sent. bcr renders the N-problem prompt as it does for a local model (the tokenizer's chat template
applied by bcr) and sends it as a completion request (``api="completions"``, the default; with vLLM's
``add_special_tokens: false``, so the server tokenises the text exactly as bcr does). With ``api="chat"``
the user message inside bcr's rendered prompt is sent as a chat request and the server applies its own
chat template. Each completion is one request (``n=1``) carrying its own seed, derived as the local engine
derives it from (prompt seed, sample index), so a server that honours seeds (vLLM does) gives the same
completions on every run; requests run ``max_concurrency`` at a time.

What is measured. Token counts come from the server's ``usage`` fields. vLLM also returns the token ids
(``return_token_ids``), which fill ``Generation.prompt_ids`` / ``completion_ids`` (checked against ``usage``;
the text is those ids decoded by bcr, as the local engines decode it); a server that returns no
ids gets bcr's own tokenisation of the prompt and of the completion text (EOS appended when the server
stopped by itself), with a warning when its count differs from the server's. With ``logprobs=True`` the
server's log-prob of each sampled token fills ``sampling_logprobs``: vLLM reports the tempered log-probs
the trainer's rollout correction expects only when started with ``--logprobs-mode processed_logprobs``
(and with top_p < 1 they are renormalised over the nucleus); its default reports untempered ones.

Budgets. The context the server holds (vLLM's and SGLang's ``max_model_len`` in ``/v1/models``, or
``context_length=``) is printed when the engine opens; a request whose prompt plus budget would not fit
gets the budget the context leaves, printed the first time each budget is cut. A prompt that leaves no
room at all is refused with one line.

Failures. Connection errors, timeouts and 408/409/429/5xx answers are retried ``max_retries`` times with
exponential backoff (the ``openai`` client's: 0.5 s doubling to 8 s, with jitter, or the server's
Retry-After). What still fails raises :class:`ServedModelError`, one line naming the server and the
cause: a refused connection, a timeout, an error status, or a response that is not the JSON an
OpenAI-compatible server returns. A failed request fails its whole ``generate`` call, so the callers
(which append results only after a call returns) never write a partial record.

Limits: a served model cannot be trained (``sync_weights`` raises); bcr needs the model's tokenizer (by
default the one at the path the server reports, else pass ``tokenizer=``); the seeds are 31-bit.
Needs the ``openai`` package: ``pip install 'bcr[served]'``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from bcr.models.rollout import Generation, _budgets, _prompt_seeds, derive_seed
from bcr.runtime.dataclass_cli import ConfigError

__all__ = ["ServedClientMissingError", "ServedEngine", "ServedModelError", "check_server", "is_served", "served_name", "served_tokenizer"]

APIS = ("completions", "chat")
_SENTINEL = "\x00bcr-user-message\x00"


class ServedModelError(ConnectionError):
    """A model server could not be reached or gave an answer bcr cannot use; the message is one line."""


class ServedClientMissingError(ConfigError, ImportError):
    """The ``openai`` client is not installed (an ImportError the ``bcr`` command prints as one line)."""


def is_served(model) -> bool:
    """Whether ``model`` names a server (an ``http://`` or ``https://`` URL) rather than a local model."""
    return isinstance(model, str) and model.lower().startswith(("http://", "https://"))


def served_name(url: str) -> str:
    """The model's name in results when none is given: the server's ``host:port``."""
    return urlparse(url).netloc or url


def _base_url(url: str) -> str:
    """``url`` without a trailing slash; a bare ``http://host:port`` gets the usual ``/v1``."""
    url = url.rstrip("/")
    return url if urlparse(url).path not in ("", "/") else url + "/v1"


def _client(url: str, *, max_retries: int = 2, timeout: float = 600.0, api_key: str | None = None):
    try:
        import openai
    except ImportError as err:
        raise ServedClientMissingError("a served model (model=http://...) needs the openai client: "
                                       "pip install 'bcr[served]'") from err
    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers accept any key
    return openai.OpenAI(base_url=_base_url(url), api_key=key, max_retries=max_retries, timeout=timeout)


def _call(client, url: str, what: str, request) -> dict:
    """Send one request through ``client`` (``request()`` returns its raw response); the JSON body as a dict,
    or one :class:`ServedModelError` line for every way it can fail."""
    import openai

    tries = f"{client.max_retries + 1} tr{'y' if client.max_retries == 0 else 'ies'}"
    try:
        raw = request()
    except openai.APITimeoutError:
        raise ServedModelError(f"the model server at {url} did not answer {what} within {client.timeout:g} s ({tries}); "
                               "raise engine_kwargs={timeout: ...} or lower max_concurrency") from None
    except openai.APIConnectionError as err:
        cause = " ".join(str(err.__cause__ or err).split())
        raise ServedModelError(f"cannot reach the model server at {url} ({tries}): {cause}; is it running, "
                               "and is the URL right?") from None
    except openai.APIStatusError as err:
        raise ServedModelError(f"the model server at {url} refused {what}: HTTP {err.status_code}: "
                               f"{_error_message(err)}") from None
    try:
        data = json.loads(raw.text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ServedModelError(f"malformed response from {url} to {what}: not a JSON object "
                               f"({_excerpt(raw.text)}); is it an OpenAI-compatible server?")
    return data


def _error_message(err) -> str:
    body = err.body if isinstance(err.body, dict) else {}  # the client passes the "error" object, or the body
    message = body.get("message") or (body.get("error") or {}).get("message") or err.message
    return " ".join(str(message).split())


def _excerpt(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _list_models(client, url: str) -> list[dict]:
    data = _call(client, url, "GET /models", lambda: client.models.with_raw_response.list())
    models = data.get("data")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and "id" in m for m in models):
        raise ServedModelError(f"malformed response from {url} to GET /models: no model list ({_excerpt(data)}); "
                               "is it an OpenAI-compatible server?")
    return models


def _pick_model(models: list[dict], url: str, served_model: str | None) -> dict:
    ids = [m["id"] for m in models]
    if served_model is not None:
        if served_model not in ids:
            raise ConfigError(f"the server at {url} does not serve {served_model!r}; it serves {ids}")
        return models[ids.index(served_model)]
    if len(models) > 1:
        raise ConfigError(f"the server at {url} serves several models {ids}: pick one with "
                          "engine_kwargs={served_model: <id>} and pass its tokenizer=")
    return models[0]


def check_server(url: str, **kwargs) -> None:
    """Raise :class:`ServedModelError` unless ``url`` answers ``GET /models`` as an OpenAI server does
    (``kwargs``: ``max_retries``, ``timeout`` (default 30 s), ``api_key``)."""
    _list_models(_client(url, **{"timeout": 30.0, **kwargs}), url)


def served_tokenizer(url: str, served_model: str | None = None, **kwargs):
    """The tokenizer of the model the server at ``url`` serves (``kwargs``: as :func:`check_server`)."""
    return _tokenizer_of(_pick_model(_list_models(_client(url, **{"timeout": 30.0, **kwargs}), url), url, served_model),
                         url)


def _tokenizer_of(info: dict, url: str):
    """Loaded from the path (or Hub id) the server reports (vLLM: ``root``, else the model's ``id``); a clear
    error asks for ``tokenizer=`` when bcr cannot load it."""
    from bcr.models.loading import load_tokenizer

    source = info.get("root") or info["id"]
    try:
        return load_tokenizer(source)
    except (ConfigError, OSError) as err:
        raise ConfigError(f"the server at {url} serves {source!r}, whose tokenizer bcr cannot load here "
                          f"({' '.join(str(err).split())}); pass tokenizer=<the model's tokenizer directory>") from None


class ServedEngine:
    """A rollout engine whose completions come from an OpenAI-compatible server (see the module docstring).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000/v1``.
        tokenizer: the served model's tokenizer (renders and counts prompts); default: loaded from the
            path the server reports.
        api: ``"completions"`` (bcr's rendered prompt as text) or ``"chat"`` (the user message; the
            server applies its chat template).
        served_model: the model id to request when the server serves several.
        max_concurrency: requests in flight at once.
        max_retries / timeout: retries of a failed request (exponential backoff) and seconds to wait
            for one response.
        context_length: the most tokens (prompt + completion) the server holds; default: what it reports.
        logprobs: ask for each sampled token's log-prob (``sampling_logprobs``).
        api_key: sent as the bearer token (default ``$OPENAI_API_KEY``, else a placeholder).
        extra_body: more request fields (merged over vLLM's ``return_token_ids`` / ``add_special_tokens``).
        verbose: print the context and the budgets fitted to it on stderr.
    """

    def __init__(self, url: str, tokenizer=None, *, api: str = "completions", served_model: str | None = None,
                 max_concurrency: int = 8, max_retries: int = 3, timeout: float = 600.0,
                 context_length: int | None = None, logprobs: bool = False, api_key: str | None = None,
                 extra_body: dict | None = None, verbose: bool = True):
        if api not in APIS:
            raise ConfigError(f"api must be one of {APIS}, got {api!r}")
        if max_concurrency < 1 or max_retries < 0 or not timeout > 0:
            raise ConfigError(f"need max_concurrency >= 1, max_retries >= 0 and timeout > 0; got {max_concurrency}, "
                              f"{max_retries}, {timeout}")
        self.url, self.api, self.logprobs, self.verbose = _base_url(url), api, logprobs, verbose
        self.max_concurrency = max_concurrency
        self.client = _client(url, max_retries=max_retries, timeout=timeout, api_key=api_key)
        info = _pick_model(_list_models(self.client, self.url), self.url, served_model)
        self.served_model: str = info["id"]
        reported = info.get("max_model_len")
        self.context_length: int | None = int(context_length or reported or 0) or None
        self.tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(info, self.url)
        self.extra_body = {"return_token_ids": True, **({"add_special_tokens": False} if api == "completions" else {}),
                           **(extra_body or {})}
        self._cut_budgets: set[int] = set()
        self._warned_counts = False
        source = "given" if context_length else ("max_model_len reported by the server" if reported else None)
        self._say(f"served model {self.served_model!r} at {self.url}: "
                  + (f"context {self.context_length} tokens ({source})" if self.context_length else
                     "the server reports no context length (pass engine_kwargs={context_length: ...} to fit budgets)"))

    def sync_weights(self, model) -> None:
        raise NotImplementedError(f"a served model ({self.url}) cannot be trained: its weights live in the server; "
                                  "train with rollout_engine=hf or vllm and serve the checkpoint afterwards")

    def generate(self, prompts: list[str], *, num_generations: int, max_new_tokens: int | list[int],
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | Sequence[int] = 0) -> list[list[Generation]]:
        """One request per (prompt, sample), ``max_concurrency`` at a time; any failure raises (see the
        module docstring) and returns nothing. ``temperature=0`` asks the server for greedy decoding."""
        seeds = _prompt_seeds(seed, len(prompts))
        budgets = _budgets(max_new_tokens, len(prompts))
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        budgets = [self._fit(len(ids), b) for ids, b in zip(prompt_ids, budgets)]
        bodies = [self._body(prompts[p], budgets[p], temperature, top_p, derive_seed(seeds[p], g) & 0x7FFFFFFF)
                  for p in range(len(prompts)) for g in range(num_generations)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(bodies)))) as pool:
            futures = [pool.submit(self._request, body) for body in bodies]
            try:
                answers = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        gens = [self._generation(prompt_ids[i // num_generations], answer) for i, answer in enumerate(answers)]
        return [gens[p * num_generations:(p + 1) * num_generations] for p in range(len(prompts))]

    # -- budgets ------------------------------------------------------------------------------------
    def _fit(self, prompt_tokens: int, budget: int) -> int:
        """``budget``, or what the context leaves after a prompt of ``prompt_tokens`` (printed once per budget)."""
        if self.context_length is None or prompt_tokens + budget <= self.context_length:
            return budget
        room = self.context_length - prompt_tokens
        if room < 1:
            raise ConfigError(f"a prompt of {prompt_tokens} tokens leaves no room for an answer in the served model's "
                              f"context of {self.context_length} tokens ({self.url}); lower n or shorten the problems")
        if budget not in self._cut_budgets:
            self._cut_budgets.add(budget)
            self._say(f"budget fitted to the served context of {self.context_length} tokens: a prompt of "
                      f"{prompt_tokens} tokens gets {room} new tokens instead of {budget} (longer prompts get less)")
        return room

    # -- one request ----------------------------------------------------------------------------------
    def _body(self, prompt: str, budget: int, temperature: float, top_p: float, seed: int) -> dict:
        body = {"model": self.served_model, "max_tokens": budget, "temperature": temperature, "top_p": top_p,
                "seed": seed, "n": 1, "extra_body": self.extra_body}
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": self._user_message(prompt)}]
            if self.logprobs:
                body.update(logprobs=True, top_logprobs=0)
        else:
            body["prompt"] = prompt
            if self.logprobs:
                body["logprobs"] = 0
        return body

    def _request(self, body: dict) -> dict:
        """Send one request; its choice, usage and token ids, checked (runs in a worker thread)."""
        if self.api == "chat":
            create, what = self.client.chat.completions.with_raw_response.create, "POST /chat/completions"
        else:
            create, what = self.client.completions.with_raw_response.create, "POST /completions"
        data = _call(self.client, self.url, what, lambda: create(**body))
        try:
            return _read_answer(data, self.api, self.logprobs)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ServedModelError(f"malformed response from {self.url} to {what}: {err} "
                                   f"({_excerpt(data)}); is it an OpenAI-compatible server?") from None

    def _generation(self, local_prompt_ids: list[int], answer: dict) -> Generation:
        prompt_ids = answer["prompt_ids"] if answer["prompt_ids"] is not None else list(local_prompt_ids)
        completion_ids, text = answer["completion_ids"], answer["text"]
        if completion_ids is None:  # the server returns no ids: bcr's tokenisation of its text
            completion_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if answer["finish_reason"] == "stop" and self.tokenizer.eos_token_id is not None:
                completion_ids.append(int(self.tokenizer.eos_token_id))
            if len(completion_ids) != answer["completion_tokens"] and not self._warned_counts:
                self._warned_counts = True
                warnings.warn(f"the server at {self.url} returns no token ids and counted {answer['completion_tokens']} "
                              f"completion tokens where bcr's tokenizer counts {len(completion_ids)}: the token counts "
                              "in the results are bcr's (serve with vLLM for the server's own ids)", stacklevel=3)
        else:  # the text as the local engines decode it (vLLM's own drops a trailing partial character)
            text = self.tokenizer.decode(completion_ids, skip_special_tokens=True)
        return Generation(prompt_ids, completion_ids, text, answer["finish_reason"] == "length", answer["logprobs"])

    def _user_message(self, prompt: str) -> str:
        """The user message inside ``prompt`` as bcr rendered it (its chat template taken off again), or the
        prompt itself when the tokenizer has no chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            return prompt
        frame = self.tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                   add_generation_prompt=True)
        head, _, tail = frame.partition(_SENTINEL)
        if not (prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail)):
            raise ValueError("api=chat sends the user message of bcr's prompt, but this prompt is not one user "
                             "message in the tokenizer's chat template (a system prompt?); use api=completions")
        return prompt[len(head):len(prompt) - len(tail)]

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"bcr: {text}", file=sys.stderr, flush=True)


def _read_answer(data: dict, api: str, logprobs: bool) -> dict:
    """The fields bcr uses from one response, type-checked; raises KeyError/TypeError/ValueError otherwise."""
    choice = data["choices"][0]
    text = choice["message"]["content"] if api == "chat" else choice["text"]
    usage = data["usage"]
    counts = {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}
    if not isinstance(text, str) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        raise TypeError("no completion text or no token counts in usage")
    ids = choice.get("token_ids")
    prompt_ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    for name, value, count in (("token_ids", ids, counts["completion_tokens"]),
                               ("prompt_token_ids", prompt_ids, counts["prompt_tokens"])):
        if value is not None and (not isinstance(value, list) or len(value) != count):
            raise ValueError(f"{name} do not match usage ({count} tokens)")
    lps = None
    if logprobs:
        lps = ([c["logprob"] for c in choice["logprobs"]["content"]] if api == "chat"
               else list(choice["logprobs"]["token_logprobs"]))
        if len(lps) != counts["completion_tokens"]:
            raise ValueError(f"{len(lps)} log-probs for {counts['completion_tokens']} tokens")
        lps = [float(x) for x in lps]
    return {"text": text, "finish_reason": choice.get("finish_reason"), "completion_ids": ids, "prompt_ids": prompt_ids,
            "logprobs": lps, **counts}
