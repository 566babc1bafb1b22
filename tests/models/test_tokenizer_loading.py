"""A tokenizer saved beside a model loads back exactly as it was saved, whatever the architecture."""

from __future__ import annotations

import warnings

import pytest
from transformers import AutoTokenizer

from bcr.models.loading import load_tokenizer
from bcr.models.tiny import tiny_model

TEXT = "Step 1: 17 + 125 = 142\nAnswer 2: \\boxed{-7} <|im_end|>"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_tokenizer_round_trips(tiny_tokenizer, tmp_path, arch):
    tiny_model(tiny_tokenizer, arch=arch).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_tokenizer(tmp_path)
    assert loaded(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    assert loaded.chat_template == tiny_tokenizer.chat_template


def test_the_problem_it_guards_against_still_exists(tiny_tokenizer, tmp_path):
    """If transformers stops swapping the class for qwen2 dirs, load_tokenizer stays correct but this
    test tells us the workaround can go."""
    tiny_model(tiny_tokenizer, arch="qwen2").save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    if auto(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]:
        pytest.skip("this transformers version keeps the saved tokenizer for qwen2: load_tokenizer's check is moot")
    with pytest.warns(UserWarning, match="tokenises differently"):
        load_tokenizer(tmp_path)
