"""The README's main job: Qwen3's post-training recipe in miniature, on two CPU cores.

    python -m train.miniature --config configs/miniature.py --workdir runs/miniature

A dense teacher learns a verifiable arithmetic task in Qwen3's thinking-mode fusion format, is
evaluated as the report evaluates (accuracy by mode and difficulty, ThinkFollow, the thinking
budget curve), and is distilled off-policy then on-policy into a smaller dense student, against the
same student trained directly on the ground truth for as many update steps. See train/miniature/recipe.py
for the stages, WORKDIR/report.md for the results and the README for why the teacher is dense.

Scaling up is the same config with other values, e.g. a Qwen3-8B teacher and a Qwen3-1.7B student
with the real tokenizer on a TPU slice:

    --config.teacher.preset=qwen3-8b --config.student.preset=qwen3-1.7b \
    --config.tokenizer.kind=qwen3 --config.dtype=bfloat16 --config.mesh.fsdp=8
"""

from train.miniature.recipe import default_config


def get_config():
    return default_config()
