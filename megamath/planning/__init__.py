"""Sizing a training run before launch (`megamath plan`): memory per GPU, step time, cost."""
