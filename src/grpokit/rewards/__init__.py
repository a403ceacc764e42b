"""What scores a completion: the reward contract, the built-in rewards and the weighted reward set (`functions`),
and a trained reward model behind the same contract (`scorer`)."""

# The built-in reward names, here so that the config (a higher layer) reads them without importing torch.
BUILTIN_REWARDS = ("accuracy", "format", "overlong")
