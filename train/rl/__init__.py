"""Reasoning RL (the GRPO family) on the policy's own samples: `python -m train.rl`.

`policy_loss(logp, old_logp, advantages, mask, *, aggregation, ...)` is the loss on whole arrays
(the stable reference) and `group_advantages` the group-relative advantages (`train.rl.loss`);
`run(config, workdir)` trains (`train.rl.trainer`), configs from `train.rl.config.default_config()`.
"""

from train.rl.loss import group_advantages, policy_loss
from train.rl.trainer import run

__all__ = ["group_advantages", "policy_loss", "run"]
