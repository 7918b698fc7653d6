"""cross_entropy matches cross_entropy_ref (loss and logit gradient) on one process, and rejects bad input."""
import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_close_3way

from megamath.kernels.cross_entropy import cross_entropy, cross_entropy_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1000), (3, 1000), (129, 1000), (3, 32016), (5, 50257)]


def _inputs(n_rows, vocab, dtype, seed, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    # Spread 3 makes softmax peaked enough that its probabilities stand above the bf16/fp16 atol.
    logits = 3.0 * torch.randn(n_rows, vocab, generator=g)
    targets = torch.randint(0, vocab, (n_rows,), generator=g)
    targets[1::3] = ignore_index  # every third row from the second is ignored
    return logits.to(DEVICE, dtype), targets.to(DEVICE)


def _run(fn, logits, targets, grad_loss, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, targets, **kwargs)
    loss.backward(grad_loss)
    return loss.detach(), logits.grad


def _check(logits, targets, ignore_index=-100):
    # grad_loss = n_valid makes each row's gradient softmax - onehot, of order 1, so atol stays meaningful.
    n_valid = max(1, int((targets != ignore_index).sum()))
    grad_loss = torch.tensor(float(n_valid), device=DEVICE)
    loss, grad = _run(cross_entropy, logits, targets, grad_loss, ignore_index=ignore_index)
    loss32, grad32 = _run(cross_entropy_ref, logits.float(), targets, grad_loss, ignore_index=ignore_index)
    loss_lo, grad_lo = _run(cross_entropy_ref, logits, targets, grad_loss, ignore_index=ignore_index)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    # The loss is a sum of logsumexps in fp32 either way: scale atol with its size.
    assert_close_3way(loss, loss32, loss_lo, atol=1e-5 * max(1.0, abs(loss32.item())), name="loss")
    assert_close_3way(grad, grad32, grad_lo, name=f"grad {tuple(logits.shape)} {logits.dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype):
    logits, targets = _inputs(*shape, dtype, seed=SHAPES.index(shape) * 3 + DTYPES.index(dtype))
    _check(logits, targets)


def test_bf16_gradient_rounds_to_nearest_as_the_reference_does():
    """One rounding of the fp32 gradient to nearest even, as the reference's cast: within twice torch's
    error with no atol. (Stored with a plain cast, which Triton's CPU interpreter truncates,
    it had over twice torch's error, hidden by the bf16 atol of the test above.)"""
    logits, targets = _inputs(8, 1000, torch.bfloat16, seed=10)
    grad_loss = torch.tensor(float((targets != -100).sum()), device=DEVICE)
    _, grad = _run(cross_entropy, logits, targets, grad_loss)
    _, grad32 = _run(cross_entropy_ref, logits.float(), targets, grad_loss)
    _, grad_lo = _run(cross_entropy_ref, logits, targets, grad_loss)
    assert_close_3way(grad, grad32, grad_lo, atol=0.0, name="grad bf16")


def test_reference_is_torch_mean_cross_entropy():
    """With some valid targets, the reference is exactly F.cross_entropy's default mean reduction."""
    logits, targets = _inputs(7, 300, torch.float32, seed=1)
    want = F.cross_entropy(logits.double(), targets)
    torch.testing.assert_close(cross_entropy_ref(logits, targets).double(), want, rtol=1e-6, atol=0)


def test_ignore_index_inside_vocabulary_and_large_logits():
    """A pad id used as ignore_index is skipped even though it is a real column; huge logits do not overflow."""
    logits, targets = _inputs(9, 1000, torch.bfloat16, seed=2, ignore_index=0)
    logits[:, 5] += 1000.0  # exp would overflow without the running max
    _check(logits, targets, ignore_index=0)


@pytest.mark.parametrize("dtype, shift", [(torch.float16, 3e4), (torch.float32, 1e6), (torch.bfloat16, 1e30)])
def test_logits_all_far_from_zero_keep_their_precision(dtype, shift):
    """Every logit of a row near 1e6: logsumexp as one fp32 number rounds by 0.06 there, which the loss and
    the softmax inherited (bf16 at 1e30 gave a loss of 0). Differences from the row's max do not."""
    logits, targets = _inputs(3, 65, torch.float32, seed=5)
    _check((logits + shift).to(dtype), targets)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    logits, _ = _inputs(4, 1000, torch.bfloat16, seed=3)
    targets = torch.full((4,), -100, dtype=torch.int64, device=DEVICE)
    logits.requires_grad_(True)
    loss = cross_entropy(logits, targets)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_minus_inf_logits_block_before_finite_ones():
    """A masked vocabulary range (-inf) that fills the first block must not turn the loss into NaN."""
    logits, targets = _inputs(3, 5000, torch.float32, seed=4)
    logits[:, :4096] = float("-inf")
    targets = torch.tensor([4096, 4999, -100], device=DEVICE)
    loss, grad = _run(cross_entropy, logits, targets, torch.tensor(1.0, device=DEVICE))
    loss32, grad32 = _run(cross_entropy_ref, logits, targets, torch.tensor(1.0, device=DEVICE))
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad32, rtol=0, atol=1e-6)


def test_strided_rows():
    """Logits as a column slice of a wider buffer (padded vocabulary) give the same result as a copy."""
    wide, targets = _inputs(5, 1100, torch.float16, seed=6)
    logits = wide[:, :1000]
    targets = targets.clamp(max=999)
    assert torch.equal(cross_entropy(logits, targets), cross_entropy(logits.contiguous(), targets))


@pytest.mark.parametrize("layout", ["column", "expanded"])
def test_strided_targets(layout):
    """Targets as a column of a (N, 2) id tensor (stride 2) or one id broadcast (stride 0) are read by row."""
    logits, targets = _inputs(6, 300, torch.float32, seed=9)
    pairs = torch.stack([targets, targets.flip(0)], dim=1)  # (N, 2)
    strided = pairs[:, 0] if layout == "column" else targets[2:3].expand(6)  # (N,), stride 2 or 0
    assert not strided.is_contiguous()
    loss, grad = _run(cross_entropy, logits, strided, torch.tensor(1.0, device=DEVICE))
    loss_ref, grad_ref = _run(cross_entropy_ref, logits, strided.contiguous(), torch.tensor(1.0, device=DEVICE))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("logits_shape,targets,message", [
    ((2, 3, 10), [1, 2], "cross_entropy expects logits (N, V), got shape (2, 3, 10)"),
    ((2, 10), [1, 2, 3], "cross_entropy expects targets (2,) for logits (2, 10), got shape (3,)"),
    ((2, 10), [1, 10], "cross_entropy: target 10 at row 1 is outside the vocabulary [0, 10) "
                       "and is not ignore_index (-100)"),
    ((2, 10), [-1, 3], "cross_entropy: target -1 at row 0 is outside the vocabulary [0, 10) "
                       "and is not ignore_index (-100)"),
])
def test_bad_inputs_raise(logits_shape, targets, message):
    with pytest.raises(ValueError) as err:
        cross_entropy(torch.zeros(logits_shape, device=DEVICE), torch.tensor(targets, device=DEVICE))
    assert str(err.value) == message


def test_unchecked_targets_give_nan_not_a_number():
    """check_targets=False (the training step's path, no host sync): an out-of-vocabulary id poisons the loss."""
    logits = torch.randn(3, 10, device=DEVICE)
    for bad in (10, -1):
        loss = cross_entropy(logits, torch.tensor([1, bad, -100], device=DEVICE), check_targets=False)
        assert torch.isnan(loss)
    good = torch.tensor([1, 9, -100], device=DEVICE)
    assert torch.equal(cross_entropy(logits, good, check_targets=False), cross_entropy(logits, good))


def test_int32_targets_raise():
    with pytest.raises(ValueError) as err:
        cross_entropy(torch.zeros(2, 10, device=DEVICE), torch.tensor([1, 2], dtype=torch.int32, device=DEVICE))
    assert str(err.value) == "cross_entropy: targets must be int64, got torch.int32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_grad", [1.0, 1 / 3, 0.125])
def test_gradient_written_in_the_forward_is_the_backward_one_bit_for_bit(dtype, loss_grad):
    """expected_grad (the gradient the caller sends into the loss, here as `(loss · g).backward()` sends it)
    changes no bit of the loss or of the logits' gradient, ignored rows included."""
    logits, targets = _inputs(7, 5000, dtype, seed=11)
    grad_loss = torch.tensor(loss_grad, device=DEVICE)
    plain = _run(cross_entropy, logits, targets, grad_loss)
    early = _run(cross_entropy, logits, targets, grad_loss, expected_grad=loss_grad)
    assert torch.equal(early[0], plain[0]) and torch.equal(early[1], plain[1])
    assert early[1][1::3].eq(0).all()  # the ignored rows


def _forward_then_change_logits(expected_grad):
    """A forward with expected_grad, then the logits changed behind autograd's back (`.data`): a backward
    that writes the gradient again reads the new logits, one that keeps the forward's gradient does not."""
    logits, targets = _inputs(5, 1000, torch.float32, seed=12)
    logits.requires_grad_(True)
    loss = cross_entropy(logits, targets, expected_grad=expected_grad)
    logits.data.mul_(-1.0)
    return logits, targets, loss


def test_the_backward_keeps_the_forwards_gradient_when_the_expected_one_arrives():
    logits, targets, loss = _forward_then_change_logits(1.0)
    loss.backward()
    _, want = _run(cross_entropy, -logits.detach(), targets, torch.tensor(1.0, device=DEVICE))  # the old logits
    assert torch.equal(logits.grad, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_another_loss_gradient_is_written_again_exactly(dtype):
    """A gradient other than the expected one: the backward writes the logits' gradient again, the same bits
    as without the hint (a gradient the forward wrote for 1.0 and rescaled would round twice)."""
    logits, targets = _inputs(7, 5000, dtype, seed=14)
    grad_loss = torch.tensor(1 / 3, device=DEVICE)
    plain = _run(cross_entropy, logits, targets, grad_loss)
    early = _run(cross_entropy, logits, targets, grad_loss, expected_grad=1.0)
    assert torch.equal(early[0], plain[0]) and torch.equal(early[1], plain[1])


def test_expected_grad_without_a_backward_changes_nothing():
    """Logits that need no gradient (evaluation) take the forward alone; the loss is the same."""
    logits, targets = _inputs(6, 700, torch.bfloat16, seed=13)
    with torch.no_grad():
        assert torch.equal(cross_entropy(logits, targets, expected_grad=1.0), cross_entropy(logits, targets))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "1.0"])
def test_expected_grad_must_be_a_finite_number(bad):
    with pytest.raises(ValueError) as err:
        cross_entropy(torch.zeros(2, 10, device=DEVICE), torch.tensor([1, 2], device=DEVICE), expected_grad=bad)
    assert str(err.value) == f"cross_entropy: expected_grad must be a finite number or None, got {bad!r}"
