"""The training stages, GRPO (`grpo`), PPO (`ppo`), SFT (`sft`) and the reward model (`reward_model`), and what they
share: the Python arguments they take (`arguments`), the run set-up (`setup`), the run loop (`loop`) and the update
loop (`update`); and the GRPO-vs-PPO comparison (`compare`). Only the stages read a whole config."""
