"""ZeRO-1 checkpoints resume on another data-parallel size: 2 ranks -> 1 process and 1 -> 2.

The optimizer state moves bit-exactly (checked element by element, by parameter name); the training
that follows matches the run that never stopped, to the tolerance of a different DP size (test_zero.py).
"""
import pytest
import torch

from distributed import run_distributed
from megamath.parallel.state import ParallelState
from megamath.parallel.zero import ZeroOptimizer
from megamath.parallel.zero_layout import read_flat, saved_layout
from test_zero import _assert_params_close, make_model, zero_config, zero_train

BEFORE, AFTER = 2, 2  # steps before the checkpoint, steps after it
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


def _continue(opt, model, dp_rank, dp_size):
    return zero_train(model, opt, AFTER, dp_rank, dp_size, start=BEFORE)


def _worker(rank, world_size, out_dir):
    state = ParallelState.from_env(1)
    # 1 -> 2: resume the single process' checkpoint on two ranks (from a model with other weights).
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = ZeroOptimizer(model, state, zero_config())
    opt.load_sharded_state_dicts([torch.load(out_dir / "single.pt")])
    loaded = {k: getattr(opt, k).clone() for k in STATE_KEYS}
    shard = opt.pieces[0][:2]  # one bucket: the rank's piece [lo, hi) of the flat vector
    _continue(opt, model, state.dp_rank, state.dp_size)
    torch.save({"params": model.state_dict(), "loaded": loaded, "shard": shard, "step": opt.step_count},
               out_dir / f"from1-{rank}.pt")
    # 2 -> 1: train two ranks from scratch, checkpoint, and keep going as the reference.
    model = make_model()
    opt = ZeroOptimizer(model, state, zero_config())
    zero_train(model, opt, BEFORE, state.dp_rank, state.dp_size)
    torch.save(opt.sharded_state_dict(), out_dir / f"two-{rank}.pt")
    _continue(opt, model, state.dp_rank, state.dp_size)
    torch.save(model.state_dict(), out_dir / f"cont2-{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single process trains BEFORE steps and saves; two ranks resume it and run the 2-rank side."""
    out_dir = tmp_path_factory.mktemp("reshard")
    model = make_model()
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config())
    zero_train(model, opt, BEFORE, 0, 1)
    single_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.sharded_state_dict().items()}
    torch.save(single_state, out_dir / "single.pt")
    _continue(opt, model, 0, 1)
    run_distributed(_worker, 2, out_dir)
    return out_dir, single_state, model


def test_one_to_two(runs):
    out_dir, single_state, single_model = runs
    for rank in range(2):
        saved = torch.load(out_dir / f"from1-{rank}.pt")
        lo, hi = saved["shard"]
        n = min(hi, single_state["master"].numel())
        for key in STATE_KEYS:  # the same layout (same model), so the new shard is a slice of the old vector
            assert torch.equal(saved["loaded"][key][:n - lo], single_state[key][lo:n]), (rank, key)
            assert not saved["loaded"][key][n - lo:].any(), "padding must be zero"
        assert saved["step"] == BEFORE + AFTER
        _assert_params_close(saved["params"], single_model, f"1 -> 2, rank {rank}")


def test_two_to_one(runs):
    out_dir, _, _ = runs
    shards = [torch.load(out_dir / f"two-{rank}.pt") for rank in (1, 0)]  # any order
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config())
    opt.load_sharded_state_dicts(shards)
    assert opt.step_count == BEFORE
    for key in STATE_KEYS:
        full = torch.cat([s[key] for s in sorted(shards, key=lambda s: s["dp_rank"])])  # (2·S,)
        assert torch.equal(getattr(opt, key)[:opt.numel], full[:opt.numel]), key
        assert not getattr(opt, key)[opt.numel:].any(), "padding must be zero"
    assert torch.equal(opt.flat_param, opt.master), "the model's weights are the loaded masters"
    _continue(opt, model, 0, 1)
    for rank in range(2):
        want = torch.load(out_dir / f"cont2-{rank}.pt")
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _recut(state: dict, dp_size: int, order: list[str]) -> list[dict]:
    """Re-cut a one-shard checkpoint into dp_size shards with the parameters placed in `order`, in the
    format of the checkpoints written before bucketing (v1: rank r holds [r·S, (r+1)·S) of one vector)."""
    slots = {name: (numel, offset) for name, numel, offset in state["params"]}
    params, offset = [], 0
    for name in order:
        params.append((name, slots[name][0], offset))
        offset += slots[name][0]
    size = -(-offset // dp_size)
    vectors = {}
    for key in STATE_KEYS:
        flat = torch.zeros(size * dp_size)
        for name, numel, new_offset in params:
            flat[new_offset:new_offset + numel] = state[key][slots[name][1]:slots[name][1] + numel]
        vectors[key] = flat.view(dp_size, size)
    v1 = {k: v for k, v in state.items() if k not in ("buckets", "shard_size")}
    return [dict(v1, format="megamath-zero1-v1", dp_size=dp_size, dp_rank=r, shard=(r * size, (r + 1) * size),
                 params=params, **{k: vectors[k][r].clone() for k in STATE_KEYS}) for r in range(dp_size)]


def _trained_single():
    model = make_model()
    opt = ZeroOptimizer(model, ParallelState.single(), zero_config())
    zero_train(model, opt, 1, 0, 1)
    return opt.sharded_state_dict()


def test_parameters_are_found_by_name_across_shard_boundaries():
    """Three old (v1) shards holding the parameters in reverse order: every piece lands by its name, into
    one bucket and into many, and a v2 checkpoint of many buckets back into one."""
    state = _trained_single()
    shards = _recut(state, 3, [name for name, _, _ in reversed(state["params"])])
    opt = ZeroOptimizer(make_model(), ParallelState.single(), zero_config())
    opt.load_sharded_state_dicts(shards)
    for key in STATE_KEYS:
        assert torch.equal(getattr(opt, key), state[key]), key
    assert opt.step_count == 1
    bucketed = ZeroOptimizer(make_model(), ParallelState.single(), zero_config(), bucket_mb=0.004)
    assert len(bucketed.buckets) > 3
    bucketed.load_sharded_state_dicts(shards)
    saved = bucketed.sharded_state_dict()
    back = ZeroOptimizer(make_model(), ParallelState.single(), zero_config())
    back.load_sharded_state_dicts([saved])
    for key in STATE_KEYS:
        assert torch.equal(getattr(back, key), state[key]), key
        assert not torch.equal(getattr(bucketed, key), state[key]), "the bucketed layout pads between buckets"


def test_bad_shards_are_refused():
    state = _trained_single()
    opt = ZeroOptimizer(make_model(), ParallelState.single(), zero_config())
    shards = _recut(state, 2, [name for name, _, _ in state["params"]])
    with pytest.raises(ValueError, match=r"^load_sharded_state_dicts: got no shards$"):
        opt.load_sharded_state_dicts([])
    with pytest.raises(ValueError, match=r"^load_sharded_state_dicts: not a megamath ZeRO-1 optimizer shard \(megamath-zero1-v1 or megamath-zero1-v2\)$"):
        opt.load_sharded_state_dicts([{"master": state["master"]}])
    with pytest.raises(ValueError, match=r"^load_sharded_state_dicts: need the shards of all 2 DP ranks exactly "
                                         r"once, got DP ranks \[1\]$"):
        opt.load_sharded_state_dicts(shards[1:])
    with pytest.raises(ValueError, match=r"^load_sharded_state_dicts: the shards are of TP rank 1 of 2, this process "
                                         r"is TP rank 0 of 1 \(resharding across tensor parallelism"):
        opt.load_sharded_state_dicts([dict(s, tp_size=2, tp_rank=1) for s in shards])
    with pytest.raises(ValueError, match=r"^load_sharded_state_dicts: DP rank 1's shard is from another run or step"):
        opt.load_sharded_state_dicts([shards[0], dict(shards[1], step=7)])
    renamed = [dict(s, params=[("extra.weight" if n == "norm.weight" else n, k, o) for n, k, o in s["params"]])
               for s in shards]
    with pytest.raises(ValueError, match=r"^load_sharded_state_dicts: the checkpoint's parameters differ from the "
                                         r"model's: missing \['norm.weight'\], unexpected \['extra.weight'\], "
                                         r"different sizes \[\]$"):
        opt.load_sharded_state_dicts(renamed)
    assert opt.step_count == 0, "a refused load changes nothing"


def test_read_flat_reads_v1_and_v2_shards_alike():
    """The reader megamath reshard uses (saved_layout + read_flat) finds every parameter in old rank-major
    (v1) shards and in bucketed (v2) ones."""
    state = _trained_single()
    v1 = _recut(state, 3, [name for name, _, _ in reversed(state["params"])])
    bucketed = ZeroOptimizer(make_model(), ParallelState.single(), zero_config(), bucket_mb=0.004)
    bucketed.load_sharded_state_dicts(v1)
    v2 = [bucketed.sharded_state_dict()]
    assert len(v2[0]["buckets"]) > 3
    for shards in (v1, v2):
        buckets, dp = saved_layout(shards[0])
        for name, numel, offset in shards[0]["params"]:
            got = read_flat([s["master"] for s in shards], buckets, dp, offset, numel)
            start = dict((n, o) for n, _, o in state["params"])[name]
            assert torch.equal(got, state["master"][start:start + numel]), (shards[0]["format"], name)
