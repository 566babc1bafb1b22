"""Models: the one loader (HF dirs, Hub ids, GGUF) and tiny from-config models for tests and demos."""
