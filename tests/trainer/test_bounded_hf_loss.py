"""The Hugging Face comparison loss (check, bench_train's hf_padded): equals labels=, in bounded memory."""

import pytest
import torch

from tests.tritrain_kernels.test_masked_ce import _LargestAllocation
from trainer.check import hf_loss_chunk_rows, padded_loss_sum
from trainer.model import lm_head_spec
from trainer.packing import PaddedBatch

V, H, B, L = 4096, 32, 3, 48


@pytest.fixture(scope="module")
def model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _batch():
    gen = torch.Generator().manual_seed(1)
    lengths = [48, 30, 9]
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, V, (n,), generator=gen)
        mask[b, :n] = 1
        labels[b, 1:n] = torch.where(torch.rand(n - 1, generator=gen) < 0.6, ids[b, 1:n], -100)
    n_loss = int((labels[:, 1:] != -100).sum())
    return PaddedBatch(
        input_ids=ids, attention_mask=mask, labels=labels, num_tokens=sum(lengths), num_loss_tokens=n_loss
    )


def test_padded_loss_sum_equals_labels_loss(model):
    batch = _batch()
    head = lm_head_spec(model)
    chunk_bytes = 5 * V * 8  # 5 positions per chunk: many chunks, one partial
    ours = padded_loss_sum(model, batch, head, torch.autocast("cpu", enabled=False), chunk_bytes=chunk_bytes)
    ours.backward()
    g_ours = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    (hf * batch.num_loss_tokens).backward()
    g_hf = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    torch.testing.assert_close(ours, hf.detach() * batch.num_loss_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_hf, rtol=1e-4, atol=1e-7)


def test_padded_loss_sum_memory_is_bounded_by_the_chunk(model):
    batch = _batch()
    head = lm_head_spec(model)
    chunk_bytes = 4 * V * 8
    rows = hf_loss_chunk_rows(V, chunk_bytes)
    with _LargestAllocation() as mode:
        padded_loss_sum(
            model, batch, head, torch.autocast("cpu", enabled=False), chunk_bytes=chunk_bytes
        ).backward()
    model.zero_grad()
    full_logits = B * L * V * 4
    # The bound from the shapes: a chunk of fp32 logits, or the [V, H] head (its gradient), or the
    # model's own activations (the [B, 1, L, L] mask, [B, L, 64] MLP): all far below B x L x V.
    bound = max(rows * V * 4, V * H * 4, B * L * L * 4, B * L * 64 * 4)
    assert mode.largest <= bound, (mode.largest, bound)
    assert mode.largest * 4 <= full_logits
    with _LargestAllocation() as mode:  # the test can fail: labels= builds the full logits
        model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss.backward()
    model.zero_grad()
    assert mode.largest >= full_logits
