"""The trained model: loading and checking model folders (`loading`), grpokit's attention kernels (`attention`),
per-token logprobs (`logprobs`), LoRA, AdamW and its schedule (`optim`), the `Policy` every stage trains through,
the weights it hands a sampler (`weights`), the critic, and saving and resuming a policy (`saving`)."""
