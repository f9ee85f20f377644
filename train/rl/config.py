"""The RL job's config: its schema (each field declared once), and `resolve_rl`.

`default_config()` is the ConfigDict `configs/rl_*.py` start from and `--config.<field>=` overrides;
`resolve_rl` checks what needs devices or files and returns the `RLJob` the run uses. `model` is
the policy (its initial checkpoint; also the frozen reference); `prompts` feed its rollouts.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from qwen3_jax.errors import ConfigError
from train import data as data_lib
from train.config import Job, JobConfig, checkpoint_tokenizer, check_shardable, model_config, resolve_mesh, resolve_shared
from train.data.config import PromptConfig
from train.rl.loss import AGGREGATIONS, KL_ESTIMATORS
from train.rollout import RolloutConfig, biasing_settings
from train.schema import config_dict, from_config_dict, need


@dataclasses.dataclass(frozen=True)
class RLLoss:
    """The policy loss (`train.rl.policy_loss`) and its advantages.

    aggregation: how per-token losses become one number.
      "token_mean": every sampled token of the batch weighs the same (DAPO, arXiv 2503.14476 §3.3,
        "token-level policy gradient loss"); "seq_mean_token_mean": each completion's token mean,
        then the mean over completions (GRPO, DeepSeekMath arXiv 2402.03300 eq. 3): a token of a
        long completion weighs less, so long wrong answers are penalised less (the length bias
        Dr. GRPO, arXiv 2503.20783 §3.1, measures); "seq_mean_token_sum_norm": the token sum over
        rows x norm_len, a constant (Dr. GRPO §3.2).
    Default: token_mean, the rule of DAPO and of verl's default ("token-mean"): no length bias
    between completions of a batch, and its gradient at a token does not depend on the length of the
    completion the token sits in; Dr. GRPO's constant normaliser also removes the dependence on the
    batch's token count, at the price of a learning rate that must follow norm_len.
    scale_advantages_by_std: GRPO divides a group's centred rewards by their std; Dr. GRPO drops it
    (it up-weights questions the policy almost always or almost never solves). Default off (Dr. GRPO).
    clip_low / clip_high: PPO's clip range (arXiv 1707.06347); DAPO's clip-higher raises the upper
    bound to 0.28 so low-probability tokens can grow (fights entropy collapse). Default DAPO's.
    kl_beta: weight of the KL to the frozen initial policy, estimated by kl_estimator (k1 or k3,
    Schulman 2020; GRPO uses k3 with beta 0.04). Default 0: DAPO and Dr. GRPO drop it for verifiable
    rewards, and without it no reference model is held (unless kl_metric asks for the KL).
    """

    aggregation: str = "token_mean"
    scale_advantages_by_std: bool = False
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    kl_metric: bool = False  # report the KL to the reference even when kl_beta = 0 (holds the reference)
    norm_len: int | None = None  # seq_mean_token_sum_norm's length; None: the update rows' length
    ppo_epochs: int = 1  # passes over each rollout batch; log-probs of the rollout stay the behaviour policy's
    ppo_minibatches: int = 1  # optimizer updates per pass, each on 1/ppo_minibatches of the rows

    def __post_init__(self):
        need(self.aggregation in AGGREGATIONS, f"rl.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        need(self.kl_estimator in KL_ESTIMATORS,
             f"rl.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        need(0 <= self.clip_low < 1, f"rl.clip_low must be in [0, 1), got {self.clip_low}")
        need(self.clip_high >= 0, f"rl.clip_high must be >= 0, got {self.clip_high}")
        need(self.kl_beta >= 0, f"rl.kl_beta must be >= 0, got {self.kl_beta}")
        need(self.norm_len is None or self.norm_len >= 1, f"rl.norm_len must be >= 1 or unset, got {self.norm_len}")
        need(self.ppo_epochs >= 1 and self.ppo_minibatches >= 1,
             f"rl.ppo_epochs and rl.ppo_minibatches must be >= 1, got {self.ppo_epochs}, {self.ppo_minibatches}")

    @property
    def uses_reference(self) -> bool:
        return self.kl_beta > 0 or self.kl_metric

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.ppo_minibatches


@dataclasses.dataclass(frozen=True)
class RLConfig(JobConfig):
    """A reasoning-RL job (`python -m train.rl`): GRPO-family updates on the policy's own samples,
    scored by a reward function. `train.steps` counts rollout batches; each makes
    rl.ppo_epochs x rl.ppo_minibatches optimizer updates (the learning-rate schedule counts those).
    `train.ce_chunk_len` is the loss's chunk of sequence positions."""

    prompts: PromptConfig | None = None  # required: prompt records; batch_size = prompts per step
    # K: completions per prompt (a GRPO group); the update batch is prompts.batch_size x K rows.
    samples: int = 8
    # 'module:function', called as function(record, completion_text) -> float for every completion
    # (the text decoded with special tokens, '</think>' included); e.g. train.rl.rewards:miniature_answer.
    reward: str | None = None
    # Rollouts sample from softmax(logits / temperature) over the whole vocabulary, the
    # distribution the loss's log-probabilities are of: top-k / top-p / min-p stay off.
    rollout: RolloutConfig = RolloutConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    rl: RLLoss = RLLoss()

    def __post_init__(self):
        super().__post_init__()
        need(self.prompts is not None and self.prompts.paths is not None,
             "prompts.paths must name the prompt files (JSONL/Parquet/ArrayRecord chat records)")
        need(self.samples >= 2, f"samples (the group size K) must be >= 2 for group advantages, got {self.samples}")
        need(self.reward is not None and ":" in self.reward,
             f"reward must name a function as 'module:function', got {self.reward!r}")
        need(self.train.z_loss_coef == 0, "train.z_loss_coef has no meaning in RL; leave it 0")
        check_on_policy_sampling(self.rollout)

    @property
    def temperature(self) -> float:
        """The temperature the loss's log-probabilities are taken at: the rollout's."""
        return self.rollout.temperature


def check_on_policy_sampling(rollout: RolloutConfig) -> None:
    """Refuses rollouts that do not sample from softmax(logits / rollout.temperature) over the whole
    vocabulary, the distribution whose log-probabilities the trainer recomputes: its importance
    ratios would be off (the same rule as distillation's sampled-token signals).

    Raises:
      ConfigError: naming the rollout fields and the values RL needs.
    """
    need(rollout.temperature is not None and rollout.temperature > 0,
         f"rollout.temperature must be set > 0 for RL (one temperature for both modes, the loss's), "
         f"got {rollout.temperature}")
    for mode in rollout.modes_used():
        bad = biasing_settings(rollout.row_sampling(mode), rollout.temperature)
        need(not bad, (
            f"RL's importance ratios need rollouts sampled from softmax(logits / rollout.temperature) over the "
            f"whole vocabulary, but {mode} rollouts sample with {', '.join('rollout.' + b for b in bad)}: set "
            "rollout.top_k=0, rollout.top_p=1.0 and rollout.min_p=0.0"))


def default_config() -> ml_collections.ConfigDict:
    """Every field of an RL job with its default (`configs/rl_*.py` start from it)."""
    return config_dict(RLConfig)


def rl_config(cd: ml_collections.ConfigDict | dict) -> RLConfig:
    """The validated RLConfig of a ConfigDict (ConfigError names an unknown or bad field)."""
    return from_config_dict(RLConfig, cd)


@dataclasses.dataclass(frozen=True)
class RLJob:
    """A resolved RL config: the policy's trainer `Job` (its data = the prompts; its optimizer's
    schedule in optimizer updates) and the update batch's shape."""

    config: RLConfig
    policy: Job
    rows: int  # completions per rollout batch: prompts.batch_size x samples
    update_rows: int  # rows per optimizer update: rows / rl.ppo_minibatches


def resolve_rl(config: RLConfig) -> RLJob:
    """Everything about `config` that needs the devices or files, checked before any device work.

    Raises:
      ConfigError: naming the field (model, mesh, context, prompt files, tokenizer, the reward
        function, the batch split).
    """
    from train.rl.rewards import load_reward  # imports the reward's module: only when resolving

    model = model_config(config.model)
    mesh = resolve_mesh(config.mesh, config.topology)
    check_shardable(model, mesh)
    try:
        data_lib.expand_paths(config.prompts.paths)
    except FileNotFoundError as e:
        raise ConfigError(f"missing prompt files: {e}") from e
    rollout = config.rollout
    need(rollout.seq_len <= model.context_length,
         f"rollout.max_prompt_len + rollout.max_new_tokens = {rollout.seq_len} exceeds the policy's context of "
         f"{model.context_length} positions")
    spec = config.tokenizer or checkpoint_tokenizer(config.model.init_from)
    need(spec is not None, "RL renders chat prompts: set `tokenizer` or use a policy checkpoint that ships one "
                           "(tokenizer.json or tokenizer.model)")
    load_reward(config.reward)
    rows = config.prompts.batch_size * config.samples
    loss = config.rl
    need(rows % loss.ppo_minibatches == 0,
         f"prompts.batch_size x samples = {rows} rows do not split into rl.ppo_minibatches={loss.ppo_minibatches}")
    update_rows = rows // loss.ppo_minibatches
    # The schedule counts optimizer updates: resolve it for train.steps x updates per step.
    updates = config.train.steps * loss.updates_per_step
    optimizer, step = resolve_shared(
        dataclasses.replace(config, train=dataclasses.replace(config.train, steps=updates)), mesh,
        batch_size=update_rows, seq_len=rollout.seq_len,
        batch_field="prompts.batch_size x samples / rl.ppo_minibatches",
        seq_field="rollout.max_prompt_len + rollout.max_new_tokens")
    step = dataclasses.replace(step, steps=config.train.steps)
    job = Job(config=config, model=model, mesh=mesh, optimizer=optimizer, step=step, data=config.prompts,
              tokenizer=spec)
    return RLJob(config, job, rows, update_rows)
