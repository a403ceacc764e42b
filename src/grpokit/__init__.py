"""grpokit: GRPO (Group Relative Policy Optimization) for Hugging Face causal language models.

from grpokit import GRPOConfig, GRPOTrainer
"""

__version__ = "0.1.0"
__all__ = ["GRPOConfig", "GRPOTrainer", "LoRAConfig", "RewardModelConfig", "SFTConfig", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import grpokit` (and `grpokit --help`) stays free of torch and transformers.
    if name == "GRPOTrainer":
        from grpokit.trainer import GRPOTrainer

        return GRPOTrainer
    if name in ("GRPOConfig", "LoRAConfig", "RewardModelConfig", "SFTConfig"):
        from grpokit import config

        return getattr(config, name)
    raise AttributeError(f"module 'grpokit' has no attribute {name!r}")
