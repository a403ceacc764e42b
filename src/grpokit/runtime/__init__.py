"""Processes and files: run folders and checkpoints written whole or not at all (`checkpoint`), torchrun ranks,
DDP and FSDP2 (`distributed`), the machine's threads and the memory estimate (`machine`)."""
