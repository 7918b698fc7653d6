"""The partition table: Llama's parameters by name, what TP splits and what is sequence-parallel, read by the
optimizer and the SP gradient sum instead of attributes on tensors (which re-created parameters lose)."""
import dataclasses

import pytest
import torch

from megamath.model import Llama, ModelConfig
from megamath.model.partition import local_shapes, parameter_shapes, partition_table
from megamath.parallel.state import ParallelState
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.zero import ZeroOptimizer

CONFIG = ModelConfig(vocab_size=64, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=3, ffn_hidden_size=64,
                     max_seq_length=16, kernels="reference")


def test_names_order_and_shapes_are_the_models():
    model = Llama(CONFIG)
    assert list(parameter_shapes(CONFIG).items()) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert local_shapes(CONFIG, 1) == parameter_shapes(CONFIG)


@pytest.mark.parametrize("kv_heads, kv_dim", [(3, None), (2, 0)])
def test_rules_at_tp2(kv_heads, kv_dim):
    config = dataclasses.replace(CONFIG, num_kv_heads=kv_heads)
    table = partition_table(config, 2, sequence_parallel=True)
    dims = {n.rsplit(".", 2)[-2] if n.startswith("layers.") else n: spec.partition_dim for n, spec in table.items()}
    assert dims == {"embed_tokens.weight": 0, "lm_head.weight": 0, "norm.weight": None, "q_proj": 0, "k_proj": kv_dim,
                    "v_proj": kv_dim, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1,
                    "input_layernorm": None, "post_attention_layernorm": None}
    assert {n for n, s in table.items() if s.sequence_parallel} == {n for n in table if n.endswith("norm.weight")}
    shapes = local_shapes(config, 2)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (48, 24)
    assert shapes["layers.0.self_attn.k_proj.weight"] == ((3 * 8, 48) if kv_dim is None else (8, 48))


def test_sequence_parallel_needs_tp():
    assert not any(s.sequence_parallel for s in partition_table(CONFIG, 1, sequence_parallel=True).values())
    assert not any(s.sequence_parallel for s in partition_table(CONFIG, 2, sequence_parallel=False).values())


def test_split_names_survive_re_created_parameters():
    """The pretrained-init path builds on the meta device and calls to_empty, which replaces every
    Parameter object; what is split and what is sequence-parallel must not change."""
    with torch.device("meta"):
        model = Llama(CONFIG)
    before = model.split_parameter_names()
    model.to_empty(device="cpu")
    assert model.split_parameter_names() == before and "lm_head.weight" in before and "norm.weight" not in before


def test_zero_optimizer_needs_split_names_under_tp():
    model = Llama(CONFIG)
    tp2 = dataclasses.replace(ParallelState.single(), tp_size=2, world_size=2)  # refused before any collective
    with pytest.raises(ValueError, match=r"^ZeroOptimizer: tensor-parallel size 2 needs split_names"):
        ZeroOptimizer(model, tp2, OptimizerConfig())
    with pytest.raises(ValueError, match=r"^ZeroOptimizer: split_names names no trainable parameter of the model: "
                                         r"model\.lm_head\.weight$"):
        ZeroOptimizer(model, ParallelState.single(), OptimizerConfig(), split_names={"model.lm_head.weight"})
