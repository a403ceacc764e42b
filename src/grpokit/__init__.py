"""grpokit: GRPO (Group Relative Policy Optimization) for Hugging Face causal language models.

from grpokit import GRPOConfig, GRPOTrainer      (and PPOConfig, PPOTrainer: PPO with a learned critic)
"""

__version__ = "0.1.0"
__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "LoRAConfig",
    "PPOConfig",
    "PPOTrainer",
    "RewardModelConfig",
    "SFTConfig",
    "__version__",
]


def __getattr__(name: str):
    # Imported on first use: `import grpokit` (and `grpokit --help`) stays free of torch and transformers.
    if name == "GRPOTrainer":
        from grpokit.stages.grpo import GRPOTrainer

        return GRPOTrainer
    if name == "PPOTrainer":
        from grpokit.stages.ppo import PPOTrainer

        return PPOTrainer
    if name in ("GRPOConfig", "LoRAConfig", "PPOConfig", "RewardModelConfig", "SFTConfig"):
        from grpokit import config

        return getattr(config, name)
    raise AttributeError(f"module 'grpokit' has no attribute {name!r}")
