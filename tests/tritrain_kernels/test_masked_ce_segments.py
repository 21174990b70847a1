"""masked_linear_logprob_sums: per-sequence sums of labelled-token log-probs on packed rows, against fp64."""

import pytest
import torch
import torch.nn.functional as F

from tests.synccount import count_syncs
from tests.tritrain_kernels.test_masked_ce import IMPLS, TOL
from tritrain_kernels import masked_linear_logprob_sums, masked_linear_logprob_sums_ref
from tritrain_kernels.masked_ce import _masked_logprob_sums


def _packed(B, T, H, V, dtype, *, seed=0, bias=False, trainable=False):
    """[B, T] packed rows: several sequences per row, one with no labelled token, one empty.

    Returns hidden [B, T, H], weight, bias, labels [B, T] and cu_seqlens over the B * T flattened rows.
    """
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * (2.0 / H**0.5)
    b = torch.randn(V, generator=gen) if bias else None
    y = torch.randint(0, V, (B * T,), generator=gen)
    y[torch.rand(B * T, generator=gen) < 0.5] = -100  # prompts and padding
    # Sequence boundaries: random cuts inside each row (a sequence never spans two rows here, as the
    # trainer packs), plus a repeated cut (an empty sequence) in row 0.
    cuts = [0]
    for r in range(B):
        inner = sorted(torch.randperm(T - 1, generator=gen)[:3].add(1).tolist())
        cuts += [r * T + c for c in inner] + [(r + 1) * T]
    cuts.insert(2, cuts[1])
    cu = torch.tensor(cuts, dtype=torch.int32)
    y[cuts[2] : cuts[3]] = -100  # the sequence after the empty one has no labelled token
    h = h.to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_(trainable)
    if b is not None:
        b = b.to(dtype).requires_grad_(trainable)
    return h, w, b, y.reshape(B, T), cu


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", [{}, {"bias": True, "softcap": 3.0}], ids=["plain", "bias-softcap"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_matches_reference_on_packed_rows(impl, dtype, opts, trainable):
    opts = dict(opts)
    bias = opts.pop("bias", False)
    h, w, b, y, cu = _packed(3, 29, 19, 203, dtype, seed=2, bias=bias, trainable=trainable)
    sums, counts = _masked_logprob_sums(h, w, y, cu, bias=b, impl=impl, scratch_bytes=8 * 203 * 8, **opts)
    S = cu.numel() - 1
    assert sums.shape == counts.shape == (S,) and sums.dtype == torch.float32 and counts.dtype == torch.int64

    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_(trainable)
    bd = None if b is None else b.detach().double().requires_grad_(trainable)
    ref_sums, ref_counts = masked_linear_logprob_sums_ref(hd, wd, y, cu, bias=bd, **opts)
    assert torch.equal(counts, ref_counts)
    assert counts[1] == 0 and counts[2] == 0  # the empty sequence; the one with no labelled token
    assert (counts > 0).sum() >= S // 2  # most sequences are scored: the comparison is informative
    assert sums[1] == 0 and sums[2] == 0
    scale = ref_sums.abs().max().item()
    err = (sums.double() - ref_sums).abs().max().item()
    assert err <= TOL[dtype]["loss"] * scale, (err, scale)

    g_out = torch.randn(S, generator=torch.Generator().manual_seed(1))  # a different weight per sequence
    params = [t for t in (h, w, b) if t is not None and t.requires_grad]
    ref_params = [t for t in (hd, wd, bd) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(sums, params, g_out)
    ref_grads = torch.autograd.grad(ref_sums, ref_params, g_out.double())
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        gerr = (got.double() - want).abs().max().item()
        assert gerr <= TOL[dtype]["grad"] * want.abs().max().item(), (gerr, want.abs().max().item())
    assert torch.count_nonzero(grads[0].reshape(-1, h.shape[-1])[y.reshape(-1) == -100]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_dpo_loss_from_the_sums(impl):
    # The use it is built for: chosen and rejected sequences packed in one row, a DPO loss from the sums
    # (reference log-probs given as constants), gradient into hidden against the fp64 reference.
    h, w, _, y, cu = _packed(2, 40, 16, 97, torch.float32, seed=4)
    S = cu.numel() - 1
    sums, _ = _masked_logprob_sums(h, w, y, cu, impl=impl)
    ref_logps = torch.randn(S, generator=torch.Generator().manual_seed(3))
    chosen, rejected = torch.arange(0, S - 1, 2), torch.arange(1, S, 2)

    def dpo(logps, ref):
        margin = (logps[chosen] - ref[chosen]) - (logps[rejected] - ref[rejected])
        return -F.logsigmoid(0.1 * margin).mean()

    (gh,) = torch.autograd.grad(dpo(sums, ref_logps), h)
    hd = h.detach().double().requires_grad_()
    ref_sums, _ = masked_linear_logprob_sums_ref(hd, w.double(), y, cu)
    (want,) = torch.autograd.grad(dpo(ref_sums, ref_logps.double()), hd)
    torch.testing.assert_close(gh.double(), want, rtol=0, atol=2e-5 * want.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_no_labelled_token_anywhere(impl):
    h, w, _, y, cu = _packed(2, 12, 8, 30, torch.float32, trainable=True)
    y = torch.full_like(y, -100)
    sums, counts = _masked_logprob_sums(h, w, y, cu, impl=impl)
    assert (sums == 0).all() and (counts == 0).all()
    sums.sum().backward()
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_public_function_one_sync_for_cu_seqlens_and_one_for_labels():
    h, w, _, y, cu = _packed(2, 20, 8, 30, torch.float32)
    with count_syncs() as syncs:
        sums, counts = masked_linear_logprob_sums(h, w, y, cu)
    assert syncs.count == 2, syncs.report()
    ref, _ = masked_linear_logprob_sums_ref(h.double(), w.double(), y, cu)
    torch.testing.assert_close(sums.double(), ref, rtol=1e-5, atol=1e-5)


def test_cu_seqlens_errors():
    h, w, _, y, cu = _packed(2, 10, 8, 30, torch.float32)
    with pytest.raises(ValueError, match="end at the number of rows 20.*end 19"):
        masked_linear_logprob_sums(h, w, y, torch.tensor([0, 5, 19]))
    with pytest.raises(ValueError, match="1 decrease"):
        masked_linear_logprob_sums(h, w, y, torch.tensor([0, 7, 5, 20]))
    with pytest.raises(ValueError, match="start at 0"):
        masked_linear_logprob_sums(h, w, y, torch.tensor([1, 20]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        masked_linear_logprob_sums(h, w, y, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer tensor; got torch.float32"):
        masked_linear_logprob_sums(h, w, y, torch.tensor([0.0, 20.0]))
