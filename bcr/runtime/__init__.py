"""Underneath everything: scale-out strategies, metrics logging, atomic file writes, dataclass CLIs."""
