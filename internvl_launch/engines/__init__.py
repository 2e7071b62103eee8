"""Engines: one interface, two implementations (Transformers in-process, vLLM as a supervised child)."""
