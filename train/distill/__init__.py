"""Strong-to-weak distillation of a Qwen3 student from a frozen teacher (`python -m train.distill`).

`divergence(student_logits, teacher_logits, mask, beta=..., temperature=...)` is the divergence on
full logits (the stable reference); training computes it in chunks (`train.distill.divergence`'s
`chunked_sums`). Import the module's other names with `from train.distill.divergence import ...`.
"""

from train.distill.divergence import divergence

__all__ = ["divergence"]
