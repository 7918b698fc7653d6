"""Coming from GPT-NeoX or Megatron-LM: their configs and command lines turned into megamath's.

`neox.py` converts a GPT-NeoX YAML config, `megatron.py` a Megatron-LM training command line, both into
the raw mapping of a megamath training config plus the list of what was not carried over and why
(`conversion.py`). `megatron_preprocess.py` runs Megatron's `tools/preprocess_data.py` flags on
megamath's preprocessing.
"""
