"""How the model is spread over devices: process groups, tensor-parallel layers, ZeRO-1."""
