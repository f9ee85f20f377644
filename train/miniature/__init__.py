"""Qwen3's post-training recipe in miniature (`python -m train.miniature`): a client of `train` and `train.distill`."""
