"""`megamath plan` over a vocabulary the TP size does not divide (a Llama fine-tune's 32,001 at TP 2).

Memory is what a rank allocates: ceil(V/p) rows of embed_tokens and lm_head (the zero padding included) and
logits as wide as the widest rank's slice. FLOPs (MFU) count the true V: the padding rows are never
multiplied, so crediting them would overstate MFU (Megatron counts its padded vocabulary; megamath does not).
"""
import dataclasses

from megamath.model.config import ModelConfig
from megamath.planning.hardware import get_gpu
from megamath.planning.memory import RunShape, memory_items
from megamath.planning.plan import PlanRequest, _tp_choices, plan

LLAMA_PAD = dataclasses.replace(ModelConfig.from_preset("llemma-7b"), vocab_size=32001)  # an added pad token
EVEN = dataclasses.replace(LLAMA_PAD, vocab_size=32002)  # the same per-rank rows at TP 2: 16,001


def test_memory_counts_the_padded_rows():
    shape = RunShape(tp=2, dp=4, micro_batch=1, grad_accum=8, seq_length=4096, activation_checkpointing=True,
                     sequence_parallel=True)
    assert memory_items(LLAMA_PAD, shape) == memory_items(EVEN, shape)
    serial = dataclasses.replace(shape, tp=1, dp=8, sequence_parallel=False)
    assert memory_items(LLAMA_PAD, serial)["params"] < memory_items(EVEN, serial)["params"]  # no padding at TP 1


def test_flops_count_the_true_vocabulary():
    h = LLAMA_PAD.hidden_size
    assert EVEN.flops_per_token(4096) - LLAMA_PAD.flops_per_token(4096) == 6 * h
    req = dict(model_name="llama-7b-pad", gpu=get_gpu("h100-80gb"), gpus=8, tp=2, micro_batch=1,
               activation_checkpointing=True, sequence_parallel=True, efficiency=0.5, seq_length=4096)
    padded, even = plan(PlanRequest(model=LLAMA_PAD, **req))[0], plan(PlanRequest(model=EVEN, **req))[0]
    assert padded.memory == even.memory
    # 6h fewer FLOPs per token: less compute time, more tokens/s, MFU from the same (true-V) count
    assert padded.time["compute"] < even.time["compute"] and padded.tokens_per_s > even.tokens_per_s


def test_search_offers_tp_sizes_that_do_not_divide_the_vocabulary():
    req = PlanRequest(model=LLAMA_PAD, model_name="llama-7b-pad", gpu=get_gpu("h100-80gb"), gpus=8)
    assert _tp_choices(req) == [1, 2, 4, 8]
