"""Overlapped ZeRO-1 equals the non-overlapped path bit for bit, and really overlaps.

One launch of 4 gloo ranks, in two layouts: DP 4, and TP 2 × DP 2 (one process start for both; each
ParallelState.from_env builds its own groups). Each trains the tiny Llama 3 steps of 2 accumulated
micro-batches through the loop's own train_step, once with both overlaps off, once with both on (many
small buckets) and once with the optimizer step overlapped too, with and without sequence parallelism
under TP. The weights, optimizer shards and step results must be identical: the overlaps change when a
collective or an update is issued, never what it computes. The DP 4 layout also records the optimizer's
events to show the order: reduce-scatters issued while the backward still delivers gradients, all-gathers
(and overlapped updates) left in flight after step() and waited for by the forward, bucket by bucket.
"""
import dataclasses
import itertools

import pytest
import torch

from distributed import run_distributed
from megamath.model.llama import Llama
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.parallel.zero_layout import bucket_numel_for, zero_layout
from megamath.training.loop import train_step
from test_zero import LRS, MODEL, batch, zero_config

STEPS, MICRO, BUCKET_MB = 3, 2, 0.004  # ~1,000 fp32 gradients per bucket: about a dozen buckets


OVERLAPS = (False, True, "step")
"""Neither overlap; the reduce-scatters' and all-gathers'; those and the optimizer step's."""


def _run(state, tp, sp: bool, overlap: bool | str, events: bool = False):
    torch.manual_seed(0)
    model = Llama(MODEL, parallel=state if tp > 1 else None, sequence_parallel=sp)
    opt = ZeroOptimizer(model, state, zero_config(), model.split_parameter_names(), bucket_mb=BUCKET_MB,
                        overlap_grad_reduce=bool(overlap), overlap_param_gather=bool(overlap),
                        overlap_optimizer_step=overlap == "step")
    rows = batch(0)[0].shape[0] // state.dp_size
    results = []
    for step in range(STEPS):
        x, y = (t[state.dp_rank * rows:(state.dp_rank + 1) * rows] for t in batch(step))
        if events and step == STEPS - 1:
            opt.events = []
        micro_batches = list(zip(x.chunk(MICRO), y.chunk(MICRO)))
        results.append(dataclasses.asdict(train_step(model, opt, micro_batches, LRS[step], state)))
    log = {"fired": set()}  # the modules whose forward pre-hooks ran in the next forward
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda *args, name=name: log["fired"].add(name))
    if events:
        log["step"] = opt.events
        log["pending_after_step"] = [w is not None for w in opt._gather_work]
        log["updates_pending_after_step"] = [w is not None for w in opt._update_work]
        opt.events = []
        model(x, y)  # the next forward waits for the all-gathers, bucket by bucket
        log["forward"] = opt.events
        log["pending_after_forward"] = [w is not None for w in opt._gather_work + opt._update_work]
        log["num_buckets"] = len(opt.buckets)
    else:
        model(x, y)
    slots = {s.name: s for s in opt.slots}
    waited = {name: [m for m in (name.rpartition(".")[0], name.rpartition(".")[0].rpartition(".")[0])
                     if slots[name].bucket in opt.forward_waits.get(m, [])] for name in slots}
    log["waited_by"] = waited  # the modules (owner, parent) whose forward pre-hook waits for a weight's bucket
    out = {"params": {k: v.clone() for k, v in model.state_dict().items()}, "results": results,
           "state": {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.sharded_state_dict().items()},
           "events": log}
    opt.remove_hooks()
    return out


def _extra_backward_error(state) -> str:
    """zero_grad(micro_batches=1), then a second backward: its gradients would land in sent buckets."""
    torch.manual_seed(0)
    model = Llama(MODEL)
    opt = ZeroOptimizer(model, state, zero_config(), bucket_mb=BUCKET_MB, overlap_grad_reduce=True)
    x, y = batch(0)
    opt.zero_grad(micro_batches=1)
    model(x, y)[1].backward()
    try:
        model(x, y)[1].backward()
        message = ""
    except RuntimeError as err:
        message = str(err)
    opt.zero_grad()  # waits for the reductions the first backward started
    opt.remove_hooks()
    return message


def _worker(rank, world_size, out_dir):
    for tp in (1, 2):
        _layout(rank, out_dir, tp)


def _layout(rank, out_dir, tp):
    state = ParallelState.from_env(tp)
    report = {}
    for sp in ((False, True) if tp > 1 else (False,)):
        for overlap in OVERLAPS:
            report[(sp, overlap)] = _run(state, tp, sp, overlap, events=(tp == 1))
    if tp == 1:
        report["extra_backward"] = _extra_backward_error(state)
    torch.save(report, out_dir / f"tp{tp}-{rank}.pt")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("overlap")
    run_distributed(_worker, 4, out_dir)
    return out_dir


@pytest.mark.parametrize("tp, world, sp", [(1, 4, False), (2, 4, False), (2, 4, True)])
def test_overlapped_equals_non_overlapped_bit_for_bit(launches, tp, world, sp):
    for rank, overlap in itertools.product(range(world), OVERLAPS[1:]):
        report = torch.load(launches / f"tp{tp}-{rank}.pt", weights_only=False)
        plain, overlapped = report[(sp, False)], report[(sp, overlap)]
        assert plain["results"] == overlapped["results"], rank
        assert not any(r["skipped"] for r in plain["results"])
        assert plain["params"].keys() == overlapped["params"].keys()
        for name in plain["params"]:
            assert torch.equal(plain["params"][name], overlapped["params"][name]), (rank, name)
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(plain["state"][key], overlapped["state"][key]), (rank, key)
        assert plain["state"]["buckets"] == overlapped["state"]["buckets"] and len(plain["state"]["buckets"]) > 3
        waited = overlapped["events"]["waited_by"]
        assert all(waited.values()), [n for n, w in waited.items() if not w]  # every weight waited for
        # ... by a module the forward calls as a module: a weight read by a plain method call would race its
        # all-gather (or, with the step overlapped, its update) on a GPU
        fired = overlapped["events"]["fired"]
        assert all(set(w) & fired for w in waited.values()), [n for n, w in waited.items() if not set(w) & fired]
        if sp:  # the fused SP projections are applied by their parent: it waits for them
            assert "layers.0.self_attn" in waited["layers.0.self_attn.q_proj.weight"]
            assert "layers.1.mlp" in waited["layers.1.mlp.up_proj.weight"]


def test_reduce_scatters_start_inside_the_backward(launches):
    for rank in range(4):
        report = torch.load(launches / f"tp1-{rank}.pt", weights_only=False)
        for overlap in (False, True):
            events = report[(False, overlap)]["events"]["step"]
            kinds = [e[0] for e in events]
            last_grad = max(i for i, k in enumerate(kinds) if k == "grad")
            first_rs = kinds.index("reduce_scatter")
            if overlap:  # bucket 0 (lm_head, the backward's first gradients) is sent before embed_tokens' arrives
                assert first_rs < last_grad and events[first_rs] == ("reduce_scatter", 0), events
                early = sum(1 for k in kinds[:last_grad] if k == "reduce_scatter")
                assert early >= report[(False, True)]["events"]["num_buckets"] - 2, events
            else:
                assert first_rs > last_grad, "without overlap nothing is sent before the backward ends"


def test_all_gathers_finish_in_the_next_forward(launches):
    for rank in range(4):
        log = torch.load(launches / f"tp1-{rank}.pt", weights_only=False)[(False, True)]["events"]
        n = log["num_buckets"]
        gathers = [e[1] for e in log["step"] if e[0] == "all_gather"]
        assert gathers == list(reversed(range(n))), "the embedding's bucket (the forward's first) is sent first"
        assert any(log["pending_after_step"]), "step() returned with its all-gathers still in flight"
        waits = [e[1] for e in log["forward"] if e[0] == "wait_all_gather"]
        assert waits and waits == sorted(waits, reverse=True), "the forward waits layer by layer, first layers first"
        assert not any(log["pending_after_forward"])
        plain = torch.load(launches / f"tp1-{rank}.pt", weights_only=False)[(False, False)]["events"]
        assert not any(plain["pending_after_step"]) and not [e for e in plain["forward"] if e[0] == "wait_all_gather"]


def test_a_backward_beyond_the_announced_count_is_refused(launches):
    for rank in range(4):
        message = torch.load(launches / f"tp1-{rank}.pt", weights_only=False)["extra_backward"]
        assert message.startswith("ZeroOptimizer: a gradient of lm_head.weight arrived after its bucket's "
                                  "reduce-scatter started: more backward passes than zero_grad(micro_batches=...) "
                                  "announced"), message


def test_an_overlapped_optimizer_step_updates_bucket_by_bucket_under_the_next_forward(launches):
    """overlap_optimizer_step: each bucket's AdamW, then its all-gather, in the forward's order (the embedding's
    bucket first); step() returns with the updates pending (on a GPU, running on a side stream), and the next
    forward waits for each bucket's update before its all-gather, first layers first, leaving nothing pending."""
    for rank in range(4):
        log = torch.load(launches / f"tp1-{rank}.pt", weights_only=False)[(False, "step")]["events"]
        n = log["num_buckets"]
        issued = [e for e in log["step"] if e[0] in ("update", "all_gather")]
        assert issued == [(kind, b) for b in reversed(range(n)) for kind in ("update", "all_gather")], issued
        assert all(log["updates_pending_after_step"])
        waits = [e for e in log["forward"] if e[0] in ("wait_update", "wait_all_gather")]
        buckets = sorted({b for _, b in waits}, reverse=True)
        assert buckets == list(reversed(range(n))) and waits[0] == ("wait_update", n - 1), waits
        for b in buckets:  # the update, then the gather, of each bucket
            assert waits.index(("wait_update", b)) < waits.index(("wait_all_gather", b)), waits
        assert not any(log["pending_after_forward"])


def test_one_gpu_leaves_its_updates_to_the_next_forward():
    """DP 1 (no all-gathers, whatever overlap_param_gather says): step() returns with every bucket's update
    pending, the next forward waits for them bucket by bucket, and grad_view and state_dict wait for the rest."""
    torch.manual_seed(0)
    model = Llama(MODEL)
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config(), bucket_mb=BUCKET_MB, overlap_optimizer_step=True)
    x, y = batch(0)
    opt.zero_grad()
    model(x, y)[1].backward()
    opt.step(LRS[0])
    assert len(opt.buckets) > 3 and all(w is not None for w in opt._update_work)
    opt.events = []
    model(x, y)
    waits = [b for kind, b in opt.events if kind == "wait_update"]
    assert waits == list(reversed(range(len(opt.buckets)))) and not any(opt._update_work)
    for wait in (lambda: opt.grad_view(model.lm_head.weight), model.state_dict):
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step(LRS[0])
        wait()
        assert not any(opt._update_work)
    opt.remove_hooks()


def test_one_gpu_overlapped_step_equals_the_plain_one_where_a_run_of_weights_fills_a_bucket_exactly():
    """DP 1: a bucket that ends exactly where its last weight ends (no padding) is followed, in the shard, by the
    next bucket's first weight. A run of AdamW merged across that boundary was updated with its first bucket
    only, after the second bucket's update had been marked done: with fp32 weights the second bucket's part of
    the run kept last step's values (its masters moved on), and on a GPU its next forward could read it mid-update."""
    def train(overlap_step: bool):
        torch.manual_seed(0)
        model = Llama(MODEL)
        opt = ZeroOptimizer(model, ParallelState.single(), zero_config(), bucket_mb=BUCKET_MB,
                            overlap_optimizer_step=overlap_step)
        for step in range(2):
            x, y = batch(step)
            opt.zero_grad()
            model(x, y)[1].backward()
            opt.step(LRS[step])
        params = {k: v.clone() for k, v in model.state_dict().items()}
        opt.remove_hooks()
        return opt, params

    opt, overlapped = train(True)
    flush = [b for b in opt.buckets[:-1] if any(s.offset + s.numel == b.end for s in opt.slots)]
    assert flush, "the layout must have a bucket its weights fill exactly for this check to mean anything"
    plain = train(False)[1]
    for name in plain:
        assert torch.equal(plain[name], overlapped[name]), name
    for b, ranges in enumerate(opt._ranges_by_bucket):  # each run lies in the bucket whose update writes it
        f0, f1, _ = opt.pieces[b]
        assert all(f0 <= r.flat_start and r.flat.stop <= f1 for r in ranges), (b, ranges)


def test_a_bucket_size_below_one_gradient_is_a_bucket_per_parameter():
    """parallel.bucket_mb > 0 asks for buckets; one smaller than a gradient's bytes rounded to 0 elements, which
    zero_layout reads as 0's one bucket: nothing overlapped, the opposite of what was asked."""
    params = [("a", (10,), False), ("b", (3, 4), False), ("c", (7,), False)]
    for bucket_mb in (1e-7, 1e-9):
        assert len(zero_layout(params, 2, bucket_numel_for(bucket_mb, 4)).buckets) == len(params)
    assert len(zero_layout(params, 2, bucket_numel_for(0.0, 4)).buckets) == 1
