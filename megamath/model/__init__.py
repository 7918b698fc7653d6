"""What the model is: its config and presets, the Llama architecture, its parameters' partition rules, and
model folders (megamath's and Hugging Face's).

    from megamath.model import Llama, ModelConfig
    model = Llama(ModelConfig.from_preset("tiny"))
"""
from megamath.model.config import PRESETS, ModelConfig
from megamath.model.llama import Llama

__all__ = ["Llama", "ModelConfig", "PRESETS"]
