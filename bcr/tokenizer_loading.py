"""Load the tokenizer saved with a model exactly as it was saved.

``AutoTokenizer.from_pretrained`` in transformers 5 picks the tokenizer class from the model type for
some architectures (``qwen2`` among them) and rebuilds its pre-tokenizer from that class, ignoring the
``tokenizer.json`` in the directory. For the model's own tokenizer that is the same thing; for any
other tokenizer saved beside a Qwen2 model (a locally trained one, say) it silently re-tokenises every
number digit by digit, so the model sees ids it was never trained on. ``load_tokenizer`` checks the
class transformers picked against the directory's ``tokenizer.json`` on a probe text and uses the
saved tokenizer when they disagree.
"""

from __future__ import annotations

import warnings
from pathlib import Path

_PROBE = "Step 1: 17 + 125 = 142, so x^2 = \\frac{3}{4}.\n### Problem 2 — Answer 2: \\boxed{-7.5} 数学"


def load_tokenizer(path: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained(path)``, unless it disagrees with ``path/tokenizer.json``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if not (Path(path) / "tokenizer.json").is_file():
        return auto
    saved = PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)
    if saved(_PROBE)["input_ids"] == auto(_PROBE)["input_ids"]:
        return auto
    warnings.warn(
        f"AutoTokenizer loaded {path} as {type(auto).__name__}, which tokenises differently from the "
        "tokenizer.json saved there; using the saved tokenizer.json",
        stacklevel=2,
    )
    return saved
