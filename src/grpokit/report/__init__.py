"""What a run says: metrics.jsonl, completions.jsonl, TensorBoard, W&B, the progress bar and the curves (`runlog`),
and the monitors that watch the reward signal for hacking and collapse (`monitor`)."""
