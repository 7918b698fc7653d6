"""Reusable training parts: config, schedule, data, loop, metrics, checkpoints (`megamath train`)."""
