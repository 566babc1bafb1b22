"""Tiny local models and tokenizers, built from a config: nothing is downloaded.

Tests and the embedded demo use these. ``build_tokenizer`` trains a byte-level BPE with the
``tokenizers`` library (so any text round-trips) and wraps it in a ``PreTrainedTokenizerFast`` with
a ChatML-style chat template; ``tiny_model`` builds a random-init Qwen2 or Llama causal LM sized for
a CPU. Both are ordinary Hugging Face objects: ``save_pretrained`` / ``from_pretrained`` work.
"""

from __future__ import annotations

import string
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DEFAULT_CORPUS = [
    "Solve each problem. Show your work under a header, then give the final answer.",
    "### Problem 1\n### Problem 2\n### Problem 3\nAnswer 1: \\boxed{12}\nAnswer 2: \\boxed{-7}\nAnswer 3: \\boxed{\\frac{1}{2}}",
    "Start with 7. Add 12. Multiply by 3. Subtract 5. What is the result?",
    "Step 1: 7 + 12 = 19\nStep 2: 19 * 3 = 57\nStep 3: 57 - 5 = 52\nCheck: 7 + 12 = 19. Correct.",
    "The answer is \\boxed{52}. Let me verify: so the final answer is 52.",
    string.ascii_letters + string.digits + string.punctuation + " \n",
]


def build_tokenizer(corpus: Iterable[str] | None = None, *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on ``corpus`` (a built-in arithmetic corpus by default).

    Special tokens: ``<|pad|>`` (padding), ``<|im_start|>``, ``<|im_end|>`` (end of a chat turn and the
    EOS that stops generation), ``<think>``, ``</think>``.
    """
    texts = list(corpus) if corpus is not None else list(_DEFAULT_CORPUS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        additional_special_tokens=["<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_model(
    tokenizer_or_vocab_size: PreTrainedTokenizerFast | int,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random-init causal LM (``arch`` = ``qwen2`` or ``llama``), seeded, in eval-ready fp32 by default."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, eos, pad, bos = tokenizer_or_vocab_size, None, None, None
    else:
        tok = tokenizer_or_vocab_size
        vocab_size = len(tok)
        eos, pad, bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=bos,
    )
    configs = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in configs:
        raise ValueError(f"arch must be one of {sorted(configs)}, got {arch!r}")
    config = configs[arch](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = pad
    return model
