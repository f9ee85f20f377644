"""Decoding: compiled prefill + KV-cache decode, sampling, thinking budgets, chat rollouts and text."""

from infer.engine import Engine, generate
from infer.text import chat_turn, complete

__all__ = ["Engine", "generate", "complete", "chat_turn"]
