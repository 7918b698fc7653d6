"""How the model is spread over devices: process groups, every collective (mappings.py), tensor-parallel
layers, ZeRO-1."""
