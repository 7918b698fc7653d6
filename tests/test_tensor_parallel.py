"""Tensor (and sequence) parallelism equals the serial model: layers, the Llama model, TP × DP, state dicts.

Every worker builds the serial model or layer itself from one seed, runs it, and runs its TP rank's part
from the serial weights' slices; both results are saved and compared here, slice by slice. fp32 and the
reference ops throughout. Exact equality for the layers (on integer data every sum is exact, whichever
rank adds it), for the seeded initialization and for state-dict slicing; allclose (1e-5) for the model's
logits, loss and gradients, where the TP run adds partial sums across ranks in another order.
One launch of 4 ranks: the TP pair of DP rank 0 runs the layers and five model cases, then all four TP 2 × DP 2,
then all four the TP 4 model cases (2 KV heads over 4 ranks: replicated; 4: one per rank).
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megamath.model import Llama, ModelConfig
from megamath.model.tp_state_dict import merge_state_dicts, shard_state_dict
from megamath.parallel.cross_entropy import vocab_parallel_cross_entropy_ref
from megamath.parallel.layers import shard_tensor
from megamath.parallel.state import ParallelState
from tp_model_pass import grads as _grads, serial_and_tp_pass

TP = 2
TOL = dict(rtol=1e-5, atol=1e-6)
BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
            max_seq_length=32, kernels="reference")
# name: (config overrides, sequence_parallel)
MODEL_CASES = {
    "kv2": (dict(), False),
    "kv2-sp-checkpointed": (dict(activation_checkpointing=True), True),
    "kv1-replicated": (dict(num_kv_heads=1), False),
    "kv1-replicated-sp": (dict(num_kv_heads=1), True),
    # 6 q heads over 2 ranks read KV heads (0, 0, 1) and (1, 2, 2): k and v are expanded per query head.
    "q6-kv3-replicated-sp": (dict(hidden_size=48, num_heads=6, num_kv_heads=3), True),
}
TP4_CASES = {  # fewer KV heads than TP ranks (replicated, each rank's one query head reads one) and one each
    "tp4-kv2-replicated-sp": (dict(), True),
    "tp4-kv4": (dict(num_kv_heads=4), False),
}
B, S = 2, 8


def config_of(case: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **{**MODEL_CASES, **TP4_CASES}[case][0]})


def batch(vocab: int, b: int = B, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, S + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[:, :2] = -100  # the same count of ignored targets in every row: DP halves weigh the same
    return tokens[:, :-1], targets


def owner(model, name: str):
    """The module that holds parameter `name`."""
    return model.get_submodule(name.rpartition(".")[0])


def _worker(rank, world_size, out_dir):
    """One launch of 4 ranks for all: the TP pair (0, 1) runs the TP 2 cases (their collectives stay in
    the TP group, so DP rank 1 has nothing to add), then all four the TP 2 × DP 2 comparison and the TP 4 cases."""
    state = ParallelState.from_env(TP)
    if state.dp_rank == 0:
        _tp2_worker(rank, state, out_dir)
    _tp2_dp2_worker(rank, state, out_dir)
    tp4 = ParallelState.from_env(4)
    torch.save({case: _model_case(tp4, case, sp) for case, (_, sp) in TP4_CASES.items()},
               out_dir / f"tp4-rank{rank}.pt")


def _tp2_worker(rank, state, out_dir):
    results = {"layers": _layer_results(state)}
    for case, (_, sp) in MODEL_CASES.items():
        results[case] = _model_case(state, case, sp)
    torch.save(results, out_dir / f"rank{rank}.pt")


def _model_case(state, case: str, sp: bool) -> dict:
    """The serial model and this rank's TP part of it, from the same seed: outputs, gradients, marks."""
    from megamath.model.ops import get_ops

    config = config_of(case)
    tokens, targets = batch(config.vocab_size)
    _, model, r = serial_and_tp_pass(config, state, sp, tokens, targets)
    r.update(marks={n: (spec.tensor_parallel, spec.sequence_parallel) for n, spec in model.partition.items()},
             layer_dims={n: (model.partition[n].partition_dim, getattr(owner(model, n), "partition_dim", None))
                         for n, _ in model.named_parameters()})
    if case == "kv2":  # the loss through the vocab-parallel Triton kernel (interpreted on CPU)
        r["tp_loss_triton"] = model._cross_entropy(get_ops("triton", "cpu"), r["tp_logits"].view(B * S, -1),
                                                   targets.reshape(-1))
    if sp:  # refused before any collective, on every rank
        try:
            model(tokens[:, :7])
        except ValueError as err:
            r["odd_length_error"] = str(err)
    return r


def _layer_results(state):
    """Each TP layer beside its serial counterpart, with and without SP, and the vocab-parallel loss.

    Weights, inputs and upstream gradients are small integers, so every product and sum is exact in fp32
    whatever its order (and whatever the BLAS blocking of a narrower matrix): the comparisons are exact.
    """
    from megamath.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    group, rank = state.tp_group, state.tp_rank
    g = torch.Generator().manual_seed(5)

    def ints(*shape):
        return torch.randint(-3, 4, shape, generator=g).float()

    w, x = ints(12, 8), ints(B, S, 8)  # column-parallel: (out, in), (B, S, in)
    w_row, x_row = ints(8, 12), ints(B, S, 12)  # row-parallel: in = 12
    table, tokens = ints(10, 8), torch.randint(0, 10, (B, S), generator=g)  # (V, h), (B, S)
    out = {}
    for sp in (False, True):
        # Under SP activations are sequence first, (S, B, ·), and a rank's chunk is a slice of dim 0.
        chunk = slice(rank * S // TP, (rank + 1) * S // TP) if sp else slice(None)

        def lay(t):
            return t.transpose(0, 1).contiguous() if sp else t

        def run(serial_fn, tp_layer, inp, weight_full, tp_input, gy, tp_gy):
            """Serial: y = serial_fn(inp, W), y.backward(gy); TP: the layer on this rank's pieces."""
            differentiable = inp.is_floating_point()
            inp_s = inp.clone().requires_grad_(differentiable)
            serial_w = weight_full.clone().requires_grad_(True)
            y_s = serial_fn(inp_s, serial_w)
            y_s.backward(gy)
            tp_in = tp_input(inp).requires_grad_(differentiable)
            y_t = tp_layer(tp_in)
            y_t.backward(tp_gy)
            return dict(y_serial=y_s.detach(), dw_serial=serial_w.grad, dx_serial=inp_s.grad,
                        y_tp=y_t.detach(), dw_tp=tp_layer.weight.grad, dx_tp=tp_in.grad)

        gy = lay(ints(B, S, 12))
        out["column", sp] = run(lambda i, wt: i @ wt.T, ColumnParallelLinear.from_full_weight(w, group, sp), lay(x),
                                w, lambda i: i[chunk].clone(), gy, gy[..., rank * 6:(rank + 1) * 6])
        gy = lay(ints(B, S, 8))
        out["row", sp] = run(lambda i, wt: i @ wt.T, RowParallelLinear.from_full_weight(w_row, group, sp),
                             lay(x_row), w_row, lambda i: i[..., rank * 6:(rank + 1) * 6].clone(), gy, gy[chunk])
        gy = lay(ints(B, S, 8))
        out["embedding", sp] = run(lambda i, wt: wt[i], VocabParallelEmbedding.from_full_weight(table, group, sp),
                                   lay(tokens), table, lambda i: i, gy, gy[chunk])
    logits = torch.randn(B * S, 64, generator=g)  # (N, V)
    targets = torch.randint(0, 64, (B * S,), generator=g)
    targets[::3] = -100
    local = logits[:, rank * 32:(rank + 1) * 32].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy_ref(local, targets, -100, group)
    loss.backward()
    out["cross_entropy"] = dict(loss=loss.detach(), grad=local.grad, logits=logits, targets=targets)
    return out


def _tp2_dp2_worker(rank, state, out_dir):
    """Ranks (0, 1) and (2, 3) are TP pairs; DP rank d takes rows [2d, 2d + 2) of a batch of 4."""
    import torch.distributed as dist

    from megamath.parallel.sequence_parallel import allreduce_sequence_parallel_grads

    config = config_of("kv2")
    torch.manual_seed(13)
    serial = Llama(config)
    model = Llama(config, state, sequence_parallel=True)
    model.load_state_dict(shard_state_dict(serial.state_dict(), config, TP, state.tp_rank))
    tokens, targets = batch(config.vocab_size, b=4)
    _, serial_loss = serial(tokens, targets)
    serial_loss.backward()
    rows = slice(2 * state.dp_rank, 2 * state.dp_rank + 2)
    _, loss = model(tokens[rows], targets[rows])
    loss.backward()
    allreduce_sequence_parallel_grads(model.sequence_parallel_parameters(), state)
    for p in model.parameters():  # what a DP gradient reduction does: the mean over DP ranks
        dist.all_reduce(p.grad, group=state.dp_group)
        p.grad /= state.dp_size
    dist.all_reduce(loss, group=state.dp_group)
    torch.save(dict(tp_rank=state.tp_rank, dp_rank=state.dp_rank, serial_loss=serial_loss.detach(),
                    serial_grads=_grads(serial), loss=loss.detach() / state.dp_size, grads=_grads(model)),
               out_dir / f"tp2dp2-rank{rank}.pt")


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tp")
    run_distributed(_worker, 4, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tp2(launch):
    return [torch.load(launch / f"rank{r}.pt") for r in range(TP)]


@pytest.fixture(scope="module")
def tp4(launch):
    return [torch.load(launch / f"tp4-rank{r}.pt") for r in range(4)]


# ---- layers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp-sp"])
def test_layers_match_serial(tp2, sp):
    """Rank r's output / gradients are exactly its slices of the serial ones (integer data: exact sums)."""
    for rank in range(TP):
        res = tp2[rank]["layers"]
        chunk = slice(rank * S // TP, (rank + 1) * S // TP) if sp else slice(None)  # of dim 0: (S, B, ·) under SP
        cols = slice(rank * 6, (rank + 1) * 6)
        expected = {
            # column: output split by columns (full sequence); dX summed over ranks, then this rank's chunk
            "column": (col := res["column", sp])["y_serial"][..., cols],
            "row": res["row", sp]["y_serial"][chunk],  # row: output summed over ranks
            "embedding": res["embedding", sp]["y_serial"][chunk],
        }
        for name, y in expected.items():
            assert torch.equal(res[name, sp]["y_tp"], y), f"{name} forward, rank {rank}"
        assert torch.equal(col["dw_tp"], col["dw_serial"][cols]), f"column dW rank {rank}"
        assert torch.equal(col["dx_tp"], col["dx_serial"][chunk]), f"column dX rank {rank}"
        row = res["row", sp]
        assert torch.equal(row["dw_tp"], row["dw_serial"][:, cols]), f"row dW rank {rank}"
        assert torch.equal(row["dx_tp"], row["dx_serial"][..., cols]), f"row dX rank {rank}"
        emb = res["embedding", sp]
        assert torch.equal(emb["dw_tp"], emb["dw_serial"][rank * 5:(rank + 1) * 5]), f"embedding dW rank {rank}"


def test_vocab_parallel_cross_entropy_ref(tp2):
    from megamath.kernels.cross_entropy import cross_entropy_ref

    ce = tp2[0]["layers"]["cross_entropy"]
    logits = ce["logits"].clone().requires_grad_(True)
    loss = cross_entropy_ref(logits, ce["targets"])
    loss.backward()
    for rank in range(TP):
        ce = tp2[rank]["layers"]["cross_entropy"]
        torch.testing.assert_close(ce["loss"], loss.detach(), **TOL)
        torch.testing.assert_close(ce["grad"], logits.grad[:, rank * 32:(rank + 1) * 32], **TOL)


def test_vocab_parallel_cross_entropy_ref_without_group():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(6, 10, generator=g), torch.tensor([0, 9, -100, 3, 3, 5])
    from megamath.kernels.cross_entropy import cross_entropy_ref

    assert torch.allclose(vocab_parallel_cross_entropy_ref(logits, targets), cross_entropy_ref(logits, targets))
    with pytest.raises(ValueError) as err:
        vocab_parallel_cross_entropy_ref(logits, torch.tensor([0, 1, 2, 10, 3, 4]))
    assert str(err.value) == ("cross_entropy: target 10 at row 3 is outside the vocabulary [0, 10) and is not "
                              "ignore_index (-100)")
    unchecked = vocab_parallel_cross_entropy_ref(logits, torch.tensor([0, 1, 2, 10, 3, 4]), check_targets=False)
    assert torch.isnan(unchecked)  # no host read, and never a finite loss


# ---- the model -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp, case", [(TP, case) for case in MODEL_CASES] + [(4, case) for case in TP4_CASES])
def test_model_matches_serial(request, tp, case):
    ranks = request.getfixturevalue(f"tp{tp}")
    config, sp = config_of(case), {**MODEL_CASES, **TP4_CASES}[case][1]
    v_local = config.vocab_size // tp
    for rank in range(tp):
        r = ranks[rank][case]
        where = f"{case} rank {rank}"
        expected_init = shard_state_dict(r["serial_state"], config, tp, rank)
        for name, tensor in r["init"].items():  # seeded like the serial model: exactly its slices
            assert torch.equal(tensor, expected_init[name]), f"{where}: init of {name}"
        assert r["tp_logits"].shape == (B, S, v_local)
        torch.testing.assert_close(r["tp_logits"], r["serial_logits"][..., rank * v_local:(rank + 1) * v_local], **TOL)
        torch.testing.assert_close(r["tp_logits_gathered"], r["serial_logits"], **TOL)
        torch.testing.assert_close(r["tp_loss"], r["serial_loss"], **TOL)
        if case == "kv2":
            torch.testing.assert_close(r["tp_loss_triton"], r["serial_loss"], **TOL)
        expected = shard_state_dict(r["serial_grads"], config, tp, rank)
        for name, grad in r["tp_grads"].items():
            torch.testing.assert_close(grad, expected[name], **TOL, msg=lambda m: f"{where}: grad of {name}: {m}")
        if sp:
            assert r["odd_length_error"] == ("sequence parallelism needs the sequence length 7 to be divisible by "
                                             f"the tensor-parallel size {tp}")
        assert list(r["marks"]) == list(r["init"]), "the partition table names the model's parameters, in order"
        for name, (table_dim, layer_dim) in r["layer_dims"].items():  # the table agrees with the layer classes
            assert table_dim == layer_dim, f"{where}: partition dim of {name}"
        for name, (split, seq) in r["marks"].items():
            replicated = "norm" in name or (config.num_kv_heads % tp and ("k_proj" in name or "v_proj" in name))
            assert split == (not replicated), f"{where}: tensor_parallel mark of {name}"
            assert seq == (sp and "norm" in name), f"{where}: sequence_parallel mark of {name}"


@pytest.mark.parametrize("case", ["kv2-sp-checkpointed", "kv1-replicated-sp"])
def test_sequence_parallel_norm_grads_are_partial_until_reduced(tp2, case):
    """Each rank's norm-weight gradient covers its own sequence chunk; the two add up to the serial one."""
    for name in tp2[0][case]["tp_grads"]:
        if "norm" not in name:
            continue
        parts = [tp2[rank][case]["tp_grads_partial"][name] for rank in range(TP)]
        serial = tp2[0][case]["serial_grads"][name]
        assert not torch.allclose(parts[0], serial, **TOL), name
        torch.testing.assert_close(parts[0] + parts[1], serial, **TOL)


def test_tp2_dp2_matches_serial(launch):
    config = config_of("kv2")
    for rank in range(4):
        r = torch.load(launch / f"tp2dp2-rank{rank}.pt")
        assert (r["tp_rank"], r["dp_rank"]) == (rank % 2, rank // 2)
        torch.testing.assert_close(r["loss"], r["serial_loss"], **TOL)
        expected = shard_state_dict(r["serial_grads"], config, TP, r["tp_rank"])
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, expected[name], **TOL, msg=lambda m: f"rank {rank} grad of {name}: {m}")


# ---- without processes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [2, 1])
def test_shard_merge_round_trip_is_bit_exact(kv_heads):
    config = ModelConfig(**{**BASE, "num_kv_heads": kv_heads})
    torch.manual_seed(0)
    full = Llama(config).state_dict()
    for tp_size in (1, 2, 4):
        shards = [shard_state_dict(full, config, tp_size, r) for r in range(tp_size)]
        q = shards[-1]["layers.1.self_attn.q_proj.weight"]
        assert torch.equal(q, full["layers.1.self_attn.q_proj.weight"][-q.shape[0]:])  # last rank: last rows
        k = shards[-1]["layers.0.self_attn.k_proj.weight"]
        assert k.shape[0] == (kv_heads * 8 // tp_size if kv_heads % tp_size == 0 else kv_heads * 8)
        merged = merge_state_dicts(shards, config)
        assert list(merged) == list(full)
        for name, tensor in full.items():
            assert torch.equal(merged[name], tensor), (tp_size, name)


def test_state_dict_errors():
    config = ModelConfig(**BASE)
    full = Llama(config).state_dict()
    cases = [
        (lambda: shard_state_dict(full, ModelConfig(**{**BASE, "vocab_size": 5}), 4, 0),
         "tensor-parallel size 4 would leave TP rank 3 no vocabulary id of vocab_size 5 (2 rows per rank): use a TP "
         "size at which every rank owns some (1, 2, 3, 5)"),
        (lambda: shard_state_dict(full, config, 8, 0), "tensor-parallel size 8 does not divide num_heads 4"),
        (lambda: shard_state_dict(full, ModelConfig(**{**BASE, "ffn_hidden_size": 66}), 4, 0),
         "tensor-parallel size 4 does not divide ffn_hidden_size 66"),
        (lambda: shard_state_dict(full, config, 2, 2), "tp_rank 2 is out of range for tensor-parallel size 2"),
        (lambda: shard_state_dict({k: v for k, v in full.items() if k != "norm.weight"}, config, 2, 0),
         "serial state dict is missing tensors: norm.weight"),
        (lambda: shard_state_dict({**full, "extra": torch.zeros(1)}, config, 2, 0),
         "serial state dict has unknown tensors: extra"),
        (lambda: merge_state_dicts([shard_state_dict(full, config, 2, 0)] * 2 + [{}], config),
         "tensor-parallel size 3 does not divide num_heads 4"),
    ]
    shards = [shard_state_dict(full, config, 2, r) for r in range(2)]
    cases.append((lambda: merge_state_dicts([shards[0], shards[0] | {"lm_head.weight": full["lm_head.weight"]}],
                                            config),
                  "TP rank 1's state dict tensors have wrong shapes: lm_head.weight (64, 32) (expected (32, 32))"))
    shards_bad = [dict(s) for s in shards]
    shards_bad[1]["layers.0.input_layernorm.weight"] = shards_bad[1]["layers.0.input_layernorm.weight"] + 1
    cases.append((lambda: merge_state_dicts(shards_bad, config),
                  "replicated tensor layers.0.input_layernorm.weight differs between TP ranks 0 and 1"))
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_model_refuses_sizes_it_cannot_split():
    fake = ParallelState(world_size=2, rank=0, tp_size=2, tp_rank=0, dp_size=1, dp_rank=0, device=torch.device("cpu"))
    fake4 = ParallelState(world_size=4, rank=0, tp_size=4, tp_rank=0, dp_size=1, dp_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^tensor-parallel size 4 would leave TP rank 3 no vocabulary id of vocab_size 5"):
        Llama(ModelConfig(**{**BASE, "vocab_size": 5}), fake4)
    with pytest.raises(ValueError, match=r"^tensor-parallel size 2 needs a tp_group$"):
        Llama(ModelConfig(**BASE), fake)


def test_serial_parallel_state_is_the_serial_model():
    config = ModelConfig(**BASE)
    torch.manual_seed(4)
    plain = Llama(config)
    torch.manual_seed(4)
    single = Llama(config, ParallelState.single(), sequence_parallel=True)  # SP is a no-op at tp_size 1
    assert not single.sequence_parallel
    assert list(single.state_dict()) == list(plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(single.state_dict()[name], tensor), name
    tokens, targets = batch(config.vocab_size)
    assert torch.equal(single(tokens, targets)[1], plain(tokens, targets)[1])


def test_shard_tensor_message():
    with pytest.raises(ValueError) as err:
        shard_tensor(torch.zeros(5, 4), 0, 2, 0, "w")
    assert str(err.value) == "cannot split w of shape (5, 4): dim 0 is not divisible by the tensor-parallel size 2"
