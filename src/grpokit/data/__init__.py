"""Rows: training and held-out data read and checked, prompts rendered and encoded, the seeded prompt order
(`rows`); the built-in offline tasks (`tasks`)."""
