"""Text generation from megamath models: a KV cache, batched decoding, model loading for inference."""
