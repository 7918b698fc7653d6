"""The training step reads the device from the host once: the loss and the optimizer's figures, together.

On a GPU every such read (`.item()`, `.tolist()`, `if tensor:`, `float(t)`, `.cpu()`, `nonzero`) waits for all
queued work and leaves the GPU idle while the host catches up; test_gpu_trainer.py checks the step under
CUDA's sync-debug mode there. This is the same check on CPU, in every CI run: the tensor methods that read
the device are counted while megamath's code (the model, its Triton kernels' launchers, ZeRO-1, the loop) is
on the stack, and Triton's CPU interpreter, which reads tensors by design, is left out.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch

from megamath.model import Llama, ModelConfig
from megamath.parallel.optimizer_config import OptimizerConfig
from megamath.parallel.state import ParallelState
from megamath.kernels.adamw import adamw_step
from megamath.parallel import zero
from megamath.parallel.zero import ZeroOptimizer
from megamath.training.loop import train_step
from distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
OURS = (str(REPO / "megamath") + "/", str(REPO / "kernels") + "/")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "nonzero")


class HostReads:
    """Counts device reads made from megamath's code while `active`: [(method, file:line of our frame)].
    `patch(obj, name, value)` installs the counters: pytest's monkeypatch.setattr, or setattr in a process
    that ends with the test."""

    def __init__(self, patch=setattr) -> None:
        self.active, self.seen = False, []
        for name in READS:
            patch(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.active:
                frames = traceback.extract_stack()[:-1]
                if not any("/triton/" in f.filename for f in frames):
                    ours = [f for f in frames if f.filename.startswith(OURS)]
                    if ours:
                        self.seen.append((name, f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno}"))
            return original(tensor, *args, **kwargs)
        return read


@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_a_training_step_reads_the_device_once(monkeypatch, kernels):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_size=48,
                         max_seq_length=32, kernels=kernels)
    # The AdamW a GPU runs (the Triton kernel, here interpreted); on CPU ZeRO-1 takes the plain-torch reference,
    # which decides a skipped step on the host.
    monkeypatch.setattr(zero, "_adamw_fn", lambda device: adamw_step)
    state = ParallelState.single()
    model = Llama(config)
    optimizer = ZeroOptimizer(model, state, OptimizerConfig(clip_grad=1.0), split_names=model.split_parameter_names())
    batches = [(t[:, :-1], t[:, 1:]) for t in torch.randint(0, 64, (2, 2, 17))]  # 2 micro-batches of (2, 16)
    reads = HostReads(monkeypatch.setattr)
    train_step(model, optimizer, batches, 1e-3, state)  # the first step builds caches
    reads.active = True
    out = train_step(model, optimizer, batches, 1e-3, state)
    reads.active = False
    assert not out.skipped and out.grad_norm > 0
    one_read = [(name, where) for name, where in reads.seen if where.startswith("megamath/training/loop.py")]
    assert len(one_read) == 1 and one_read[0][0] == "tolist", reads.seen  # the step's own read
    assert sorted(set(reads.seen) - set(one_read)) == []  # nothing else, in any file


VOCABS = (64, 63)  # split evenly over TP 2, and padded


def _parallel_worker(rank, world_size, out_dir):
    zero._adamw_fn = lambda device: adamw_step  # the GPU's AdamW, as above
    state = ParallelState.from_env(tp_size=2)
    reads = HostReads()
    for vocab in VOCABS:
        config = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                             ffn_hidden_size=48, max_seq_length=32, kernels="reference")
        torch.manual_seed(0)
        model = Llama(config, parallel=state, sequence_parallel=True)
        optimizer = ZeroOptimizer(model, state, OptimizerConfig(clip_grad=1.0),
                                  split_names=model.split_parameter_names(), bucket_mb=0.002,
                                  overlap_grad_reduce=True, overlap_param_gather=True)  # a few buckets
        batches = [(t[:, :-1], t[:, 1:]) for t in torch.randint(0, vocab, (2, 1, 17))]
        train_step(model, optimizer, batches, 1e-3, state)
        reads.seen, reads.active = [], True
        out = train_step(model, optimizer, batches, 1e-3, state)
        reads.active = False
        assert not out.skipped and out.grad_norm > 0
        (Path(out_dir) / f"rank{rank}-v{vocab}.json").write_text(json.dumps(reads.seen))


def test_tensor_sequence_and_data_parallel_steps_read_the_device_once(tmp_path):
    """TP 2 with sequence parallelism x DP 2 with overlapped, bucketed ZeRO-1: the collectives, their hooks and
    the sharded optimizer add no read; nor does a vocabulary TP 2 does not divide (63: padded, narrower logits)."""
    run_distributed(_parallel_worker, 4, tmp_path)
    for rank, vocab in [(r, v) for r in range(4) for v in VOCABS]:
        seen = [tuple(r) for r in json.loads((tmp_path / f"rank{rank}-v{vocab}.json").read_text())]
        assert [name for name, where in seen if where.startswith("megamath/training/loop.py")] == ["tolist"], seen
        assert [r for r in seen if not r[1].startswith("megamath/training/loop.py")] == [], (rank, seen)
