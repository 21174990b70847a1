import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (
    Glm4Config,
    Glm4ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from trainer.model import (
    ATTN_NAME,
    decoder_hidden_states,
    enable_activation_checkpointing,
    enable_varlen_attention,
)
from trainer.packing import make_packed_batches

VOCAB = 97
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0,
)  # fmt: skip
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "glm4": lambda: Glm4ForCausalLM(Glm4Config(**SMALL, head_dim=16, pad_token_id=0, eos_token_id=1)),
}
LENGTHS = [13, 1, 29, 7, 20]


@dataclass
class Enc:
    input_ids: list[int]
    labels: list[int]


def _conversations(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        keep = torch.rand(n, generator=g) < 0.5
        out.append(Enc(ids.tolist(), torch.where(keep, ids, -100).tolist()))
    return out


def _models(arch, lora=False):
    """(packed model with varlen attention, reference copy with SDPA), same weights, fp32."""
    torch.manual_seed(0)
    model = ARCHS[arch]().float().eval()
    if lora:
        cfg = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        model = get_peft_model(model, cfg)
        with torch.no_grad():  # B starts at 0; make it nonzero so that A's gradient is too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    ref = copy.deepcopy(model)
    (ref.get_base_model() if lora else ref).set_attn_implementation("sdpa")
    enable_varlen_attention(model)
    return model, ref


def _alone_hidden(ref, enc):
    base = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    ids = torch.tensor([enc.input_ids])
    return base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]


def _lm_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_logits_equal_each_conversation_alone(arch):
    model, ref = _models(arch)
    assert model.config._attn_implementation == ATTN_NAME
    encoded = _conversations(LENGTHS)
    (batch,) = make_packed_batches(encoded, 128)
    w = _lm_head(model)
    with torch.no_grad():
        packed = decoder_hidden_states(model, batch)[0] @ w.T
        cu = batch.cu_seqlens.tolist()
        for j, (start, end) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
            enc = next(e for e in encoded if e.input_ids == batch.input_ids[0, start:end].tolist())
            alone = _alone_hidden(ref, enc) @ w.T
            diff = (packed[start:end] - alone).abs().max().item()
            assert diff <= 1e-5, f"conversation {j}: max abs diff {diff}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_changing_one_conversation_leaves_the_others_alone(arch):
    model, _ = _models(arch)
    encoded = _conversations([11, 17, 9])
    changed = copy.deepcopy(encoded)
    changed[1] = _conversations([23], seed=5)[0]  # different tokens and a different length
    with torch.no_grad():
        outs = []
        for convs in (encoded, changed):
            (batch,) = make_packed_batches(convs, 128)
            h = decoder_hidden_states(model, batch)[0]
            cu = batch.cu_seqlens.tolist()
            spans = {
                tuple(batch.input_ids[0, s:e].tolist()): h[s:e] for s, e in zip(cu[:-1], cu[1:], strict=True)
            }
            outs.append(spans)
    for keep in (encoded[0], encoded[2]):
        key = tuple(keep.input_ids)
        torch.testing.assert_close(outs[0][key], outs[1][key], atol=1e-6, rtol=0)
    assert not torch.allclose(
        outs[0][tuple(encoded[1].input_ids)][:9], outs[1][tuple(changed[1].input_ids)][:9]
    )


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_gradients_of_packed_batch_equal_sum_over_conversations(arch):
    model, ref = _models(arch, lora=True)
    encoded = _conversations(LENGTHS, seed=1)
    (batch,) = make_packed_batches(encoded, 128)
    w = _lm_head(model)

    h = decoder_hidden_states(model, batch)[0].index_select(0, batch.loss_index)
    loss = F.cross_entropy(h @ w.T, batch.loss_targets, reduction="sum")
    loss.backward()
    packed = _lora_grads(model)

    total = 0.0
    for enc in encoded:
        h = _alone_hidden(ref, enc)
        labels = torch.tensor(enc.labels)
        total = total + F.cross_entropy(h[:-1] @ w.T, labels[1:], ignore_index=-100, reduction="sum")
    total.backward()
    alone = _lora_grads(ref)

    torch.testing.assert_close(loss, total, atol=1e-4, rtol=1e-6)
    assert packed.keys() == alone.keys() and len(packed) == 2 * 4 * SMALL["num_hidden_layers"]
    for name in packed:
        assert alone[name].abs().max() > 0, name
        torch.testing.assert_close(
            packed[name], alone[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_lora_gradients(use_reentrant):
    model, _ = _models("qwen2", lora=True)
    (batch,) = make_packed_batches(_conversations(LENGTHS, seed=2), 128)
    w = _lm_head(model)

    def grads():
        model.zero_grad(set_to_none=True)
        h = decoder_hidden_states(model, batch)[0].index_select(0, batch.loss_index)
        F.cross_entropy(h @ w.T, batch.loss_targets, reduction="sum").backward()
        return _lora_grads(model)

    plain = grads()
    base = model.get_base_model()
    base.train()  # transformers checkpoints only in training mode
    enable_activation_checkpointing(base, use_reentrant=use_reentrant)
    if use_reentrant:
        base.enable_input_require_grads()  # frozen embeddings: reentrant checkpointing needs a grad input
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_decoder_without_varlen_attention_is_refused():
    torch.manual_seed(0)
    model = ARCHS["llama"]()
    (batch,) = make_packed_batches(_conversations([5, 6]), 32)
    with pytest.raises(ValueError, match="call enable_varlen_attention"):
        decoder_hidden_states(model, batch)


def test_varlen_attention_without_cu_seqlens_is_refused():
    model, _ = _models("llama")
    with pytest.raises(ValueError, match="needs cu_seq_lens_q/k"):
        model.model(
            input_ids=torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([[0, 1, 0]]), use_cache=False
        )
