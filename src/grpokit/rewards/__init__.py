"""What scores a completion: the reward contract, the built-in rewards and the weighted reward set (`functions`),
a trained reward model behind the same contract (`scorer`), and code run against test cases in the sandbox
(`code`)."""

# The built-in reward names, here so that the config (a higher layer) reads them without importing torch.
BUILTIN_REWARDS = (
    "accuracy",
    "format",
    "overlong",
    "code_tests",
    "math_accuracy",
    "format_think_answer",
    "format_answer_tags",
)
