"""embedding_backward (the embedding table's gradient into a buffer) against its reference and exact sums, at
awkward shapes and dtypes, written and added, with foreign ids, repeated ids and rows no token touches."""
import pytest
import torch

from megamath.kernels.embedding_backward import MAX_BLOCK_D, embedding_backward, embedding_backward_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rows: int, cols: int, tokens: int, dtype: torch.dtype, seed: int = 0):
    """grad (2, tokens/2, cols), ids with a few rows repeated many times, some never, some ids foreign."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(tokens, cols, generator=generator).to(dtype)
    ids = torch.randint(0, rows // 2, (tokens,), generator=generator)  # rows >= rows/2: untouched
    ids[::3] = 1  # a frequent token, its rows summed in order
    ids[5::7] = -1  # foreign tokens (another TP rank's vocabulary): nothing
    ids[6::11] = rows
    return grad.view(2, tokens // 2, cols).to(DEVICE), ids.view(2, tokens // 2).to(DEVICE)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(37, 100), (6, MAX_BLOCK_D + 3), (64, 16)])
def test_written_then_added_matches_the_reference(rows, cols, grad_dtype, out_dtype):
    """The same fp32 sums in the same token order: bit for bit on a CPU (index_add_ runs in order there)."""
    grad, ids = _case(rows, cols, 38, grad_dtype)
    ours = torch.full((rows, cols), float("nan"), dtype=out_dtype, device=DEVICE)  # the write ignores it
    ref = ours.clone()
    embedding_backward(grad, ids, ours)
    embedding_backward_ref(grad, ids, ref)
    if DEVICE == "cpu":
        assert torch.equal(ours, ref)
    torch.testing.assert_close(ours, ref, rtol=1e-6 if out_dtype == torch.float32 else 2 ** -8, atol=1e-6)
    assert not ours[rows // 2:].any()  # untouched rows: zero, not the NaN they held
    later, _ = _case(rows, cols, 38, grad_dtype, seed=1)
    embedding_backward(later, ids, ours, add=True)
    embedding_backward_ref(later, ids, ref, add=True)
    if DEVICE == "cpu":
        assert torch.equal(ours, ref)
    torch.testing.assert_close(ours, ref, rtol=1e-6 if out_dtype == torch.float32 else 2 ** -8, atol=1e-6)


def test_sums_are_fp32_sums_of_the_rows_in_token_order():
    """bf16 gradients of one row added in fp32 and stored in the fp32 buffer unrounded (the hook's path adds a
    gradient already rounded to bf16)."""
    grad = torch.tensor([[1.0], [2 ** -9], [2 ** -9], [2 ** -9], [2 ** -9]], dtype=torch.bfloat16, device=DEVICE)
    ids = torch.zeros(5, dtype=torch.long, device=DEVICE)
    out = torch.zeros(2, 1, device=DEVICE)
    embedding_backward(grad, ids, out)
    assert out[0].item() == 1 + 4 * 2 ** -9 and out[1].item() == 0  # a bf16 running sum would stay at 1.0


def test_added_rows_untouched_keep_their_bits_and_the_kernel_is_deterministic():
    """add=True reads and writes only the rows the tokens touch (a -0.0 or NaN elsewhere stays as it was); two
    runs give the same bits (no atomics)."""
    grad, ids = _case(40, 48, 60, torch.bfloat16)
    base = torch.randn(40, 48, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    base[30] = -0.0
    base[31] = float("nan")
    first, second = base.clone(), base.clone()
    embedding_backward(grad, ids, first, add=True)
    embedding_backward(grad, ids, second, add=True)
    assert torch.equal(first[:20], second[:20]) and torch.equal(first[20:30], base[20:30])
    assert torch.equal(first[30], base[30]) and torch.signbit(first[30]).all() and first[31].isnan().all()


def test_integer_gradients_sum_exactly_into_a_slot_of_a_flat_buffer():
    """A view at an offset of a flat buffer (the optimizer's slot): only the view changes, with exact sums."""
    flat = torch.full((7 + 12 * 5 + 9,), 3.0, device=DEVICE)
    slot = flat[7:7 + 12 * 5].view(12, 5)
    ids = torch.tensor([[4, 0, 4], [11, 4, 2]], device=DEVICE)
    grad = torch.arange(30.0, device=DEVICE).view(2, 3, 5)
    embedding_backward(grad, ids, slot, add=True)
    want = torch.full((12, 5), 3.0, device=DEVICE)
    for token, row in zip(ids.flatten().tolist(), grad.view(6, 5)):
        want[token] += row
    assert torch.equal(slot, want)
    assert (flat[:7] == 3).all() and (flat[-9:] == 3).all()
    embedding_backward(grad[:, :0], ids[:, :0], slot)  # no tokens: the whole table's gradient is zero
    assert not slot.any()


@pytest.mark.parametrize("call, message", [
    (lambda: embedding_backward(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(5, 4).t()),
     r"^embedding_backward: out must be a \(V, D\) table with contiguous rows, got shape \(4, 5\) with strides "
     r"\(1, 4\)$"),
    (lambda: embedding_backward(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long),
                                torch.zeros(5, 4, dtype=torch.float64)),
     r"^embedding_backward: out must be float32, bfloat16 or float16, got torch.float64$"),
    (lambda: embedding_backward(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), torch.zeros(5, 4)),
     r"^embedding_backward: grad must be floating point with out's row length 4 last, got torch.float32 of "
     r"shape \(3, 5\)$"),
    (lambda: embedding_backward(torch.zeros(3, 4), torch.zeros(3), torch.zeros(5, 4)),
     r"^embedding_backward: ids must be integers, one per row of grad, got torch.float32 of shape \(3,\) for "
     r"grad \(3, 4\)$"),
    (lambda: embedding_backward(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), torch.zeros(5, 4)),
     r"^embedding_backward: ids must be integers, one per row of grad, got torch.int64 of shape \(2,\) for "
     r"grad \(3, 4\)$"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("id_dtype, rows, foreign, add", [(torch.uint8, 300, None, False),
                                                          (torch.int8, 300, -128, False),
                                                          (torch.int16, 32769, -32768, True)])
def test_ids_narrower_than_the_vocabulary_reach_every_row(id_dtype, rows, foreign, add):
    """Row numbers were made in the ids' dtype: with uint8 ids, rows 256 and 257 got rows 0 and 1's sums. Made
    in a signed dtype, the first row past its maximum is its minimum, which a foreign id may hold: int8 row 128
    got id -128's sum. Adding, the rows are the sorted ids themselves (one program per token), made in int64:
    int16 ids with a foreign -32768 into a table past 32767 rows keep that so (row 32768 would show the
    foreign sum as 8 instead of 7)."""
    ids = torch.tensor([0, 1] if foreign is None else [0, 1, foreign], dtype=id_dtype)
    grad = torch.ones(len(ids), 4)
    out = embedding_backward(grad, ids, torch.full((rows, 4), 7.0), add=add)
    untouched = 7.0 if add else 0.0
    assert out[:2].eq(untouched + 1).all() and out[2:].eq(untouched).all(), out[out[:, 0] != untouched]
