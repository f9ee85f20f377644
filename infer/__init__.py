"""Decoding: compiled prefill + KV-cache decode, sampling, thinking budgets, chat."""

from infer.engine import Engine, generate

__all__ = ["Engine", "generate"]
