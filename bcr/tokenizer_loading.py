"""Kept so that existing ``from bcr.tokenizer_loading import load_tokenizer`` imports still work: the
tokenizer loader (and its protection against transformers swapping a saved tokenizer's class) lives
in :mod:`bcr.model_loading` with the model loader, since both read the same sources."""

from __future__ import annotations

from .model_loading import load_tokenizer

__all__ = ["load_tokenizer"]
