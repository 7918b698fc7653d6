"""Under sequence parallelism the collectives move contiguous, sequence-first memory: no copy in or out.

On 2 gloo ranks with the rank-major single-tensor collectives NCCL uses (MEGAMATH_COLLECTIVES=native), a
TP 2 + SP Llama at micro-batch 2 runs a forward and a backward while every all_gather / reduce_scatter
is recorded with the bytes megamath copies around the collective itself (aten clone, copy_, cat; what the
backend does inside all_gather_into_tensor / reduce_scatter_tensor is not counted): each call splits
dim 0 and copies nothing. As a control, the same functions on batch-first chunks, (B, S/p, h) split along dim 1, do copy
(the layout megamath used before), so the check can fail. That the sequence-first model equals the serial
one is test_tensor_parallel's and test_tp_from_hf's business.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distributed import native_collectives_supported, run_and_load
from megamath.model.config import ModelConfig
from megamath.model.llama import Llama
from megamath.parallel import layers, mappings
from megamath.parallel.state import ParallelState

CONFIGS = {  # q/k/v through one all-gather; and replicated K/V heads, which take tp_region_input
    "kv2": ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=64, max_seq_length=16, kernels="reference"),
    "kv1-replicated": ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1,
                                  ffn_hidden_size=64, max_seq_length=16, kernels="reference"),
}
B, S, P = 2, 8, 2
_COPIES = {torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy, torch.ops.aten.cat}


class _CopiedBytes(TorchDispatchMode):
    """Counts the bytes written by copying ops while active, except inside the backend's collective."""

    in_backend = False

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _COPIES and not _CopiedBytes.in_backend:
            result = out if isinstance(out, torch.Tensor) else args[0]
            self.bytes += result.numel() * result.element_size()
        return out


def _recording(fn, name, calls):
    def wrapped(x, dim, group):
        with _CopiedBytes() as copied:
            y = fn(x, dim, group)
        calls.append((name, dim, tuple(x.shape), copied.bytes))
        return y
    return wrapped


def _backend(collective):
    def wrapped(*args, **kwargs):
        _CopiedBytes.in_backend = True
        try:
            return collective(*args, **kwargs)
        finally:
            _CopiedBytes.in_backend = False
    return wrapped


def _worker(rank, world_size, out_dir):
    state = ParallelState.from_env(P)
    results = {"native": native_collectives_supported(state.tp_group)}
    if results["native"]:
        os.environ[mappings.COLLECTIVES_ENV] = "native"  # this worker process only
        mappings.all_gather_into = _backend(mappings.all_gather_into)
        mappings.reduce_scatter_into = _backend(mappings.reduce_scatter_into)
        originals = mappings.all_gather, mappings.reduce_scatter
        for name, config in CONFIGS.items():
            calls = []
            gather, scatter = _recording(originals[0], "all_gather", calls), _recording(originals[1], "reduce_scatter",
                                                                                        calls)
            mappings.all_gather, mappings.reduce_scatter = layers.all_gather, layers.reduce_scatter = gather, scatter
            try:
                torch.manual_seed(0)
                model = Llama(config, state, sequence_parallel=True)
                tokens = torch.randint(0, config.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
                forward_calls = len(calls)
                loss.backward()
            finally:
                mappings.all_gather, mappings.reduce_scatter = layers.all_gather, layers.reduce_scatter = originals
            results[name] = dict(calls=calls, forward_calls=forward_calls)
        control = []  # batch first, split along dim 1
        _recording(mappings.all_gather, "all_gather", control)(torch.randn(B, S // P, 32), 1, state.tp_group)
        _recording(mappings.reduce_scatter, "reduce_scatter", control)(torch.randn(B, S, 32), 1, state.tp_group)
        results["control"] = control
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sp_layout")
    return run_and_load(_worker, P, out_dir)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_sequence_collectives_split_dim_0_and_copy_nothing(results, case):
    if not results[0]["native"]:
        pytest.skip("this torch's gloo has no single-tensor all-gather / reduce-scatter (the portable path "
                    "copies by design); the layout is checked where NCCL's code path can run")
    L = CONFIGS[case].num_layers
    for rank in range(P):
        calls, forward_calls = results[rank][case]["calls"], results[rank][case]["forward_calls"]
        # forward: the embedding's reduce-scatter, per layer 2 gathers + 2 reduce-scatters, the LM head's gather;
        # backward: each of those has an adjoint, and each gathering matmul gathers its input again, except
        # the attention with replicated K/V heads, which keeps its gathered input (layers.column_parallel_inputs).
        regathers = L * (1 if case == "kv1-replicated" else 2) + 1
        assert forward_calls == 2 + 4 * L, calls
        assert len(calls) == 2 * forward_calls + regathers, calls
        for name, dim, shape, copied in calls:
            assert dim == 0 and shape[1] == B, (name, dim, shape)
            assert copied == 0, f"rank {rank}: {name} of {shape} copied {copied} bytes"


def test_batch_first_control_does_copy(results):
    if not results[0]["native"]:
        pytest.skip("this torch's gloo has no single-tensor collectives")
    for name, dim, shape, copied in results[0]["control"]:
        assert dim == 1 and copied > 0, (name, shape, copied)
