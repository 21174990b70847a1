import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from trainer.config import load_config
from trainer.model import ATTN_NAME, apply_lora, head_scale, lm_head_spec, load_model, prepare_model

SMALL = dict(
    vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
)  # fmt: skip


def _tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    return cls(config_cls(**SMALL, **extra)).float()


def _logits_from_spec(model, ids):
    weight, bias, softcap = lm_head_spec(model, check=False)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state * head_scale(model)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def test_plain_head():
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    weight, bias, softcap = lm_head_spec(model)
    assert weight is model.lm_head.weight and bias is None and softcap is None


def test_tied_embeddings_use_the_embedding_matrix():
    model = _tiny(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True)
    weight, _, _ = lm_head_spec(model)
    assert weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_gemma2_softcap_matches_the_model_logits():
    model = _tiny(Gemma2ForCausalLM, Gemma2Config, final_logit_softcapping=0.5).eval()
    _, _, softcap = lm_head_spec(model)
    assert softcap == 0.5
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(_logits_from_spec(model, ids), model(input_ids=ids).logits)


@pytest.mark.parametrize("logits_scaling", [8.0, 0.25])
def test_granite_logits_scaling_is_folded_into_the_hidden_states(logits_scaling):
    model = _tiny(GraniteForCausalLM, GraniteConfig, logits_scaling=logits_scaling).eval()
    assert head_scale(model) == 1 / logits_scaling
    lm_head_spec(model)  # checked against the model's own logits
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(_logits_from_spec(model, ids), model(input_ids=ids).logits)


def test_unexpressible_logit_scaling_is_refused_naming_the_field():
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    model.config.mup_width_scale = 0.5
    with pytest.raises(ValueError, match=r"config.mup_width_scale=0.5 rescales the logits"):
        lm_head_spec(model)


def test_unknown_transformation_is_caught_numerically():
    # Llama ignores final_logit_softcapping: the spec would cap logits the model does not cap.
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    model.config.final_logit_softcapping = 0.05
    with pytest.raises(ValueError, match="logits are not lm_head"):
        lm_head_spec(model)


def test_lora_on_the_head_is_refused():
    cfg = load_config(["--model", "x", "--lora-target-modules", "q_proj,lm_head", "--lora-dropout", "0"])
    with pytest.raises(ValueError, match="remove it from lora_target_modules"):
        apply_lora(_tiny(LlamaForCausalLM, LlamaConfig), cfg)


def test_unknown_target_module_is_a_clear_error():
    cfg = load_config(["--model", "x", "--lora-target-modules", "qkv_projection"])
    with pytest.raises(ValueError, match="lora_target_modules"):
        apply_lora(_tiny(LlamaForCausalLM, LlamaConfig), cfg)


def test_demo_model_is_glm4_sized_to_the_tokenizer_and_seeded():
    cfg = load_config(["--device", "cpu"])
    model, tokenizer = load_model(cfg)
    again, _ = load_model(cfg)
    assert model.config.model_type == "glm4"
    assert model.config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32
    torch.testing.assert_close(model.lm_head.weight, again.lm_head.weight, rtol=0, atol=0)
    lora = apply_lora(model, cfg)
    adapted = {n.split(".")[-1] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_prepare_model_for_training_and_for_inference():
    cfg = load_config(["--device", "cpu"])
    lines = []
    model, tokenizer, head = prepare_model(cfg, log=lines.append)
    base = model.get_base_model()
    assert lines == ["attention layers 0-3: reference (causal)"]  # the choice, printed once
    assert base.config._attn_implementation == ATTN_NAME and model.training
    assert head.weight is base.lm_head.weight and head.softcap is None
    assert len(tokenizer) == base.config.vocab_size
    plain, _, _ = prepare_model(cfg, for_training=False, log=lines.append)
    assert plain.config._attn_implementation != ATTN_NAME and not plain.training
    assert not hasattr(plain, "peft_config") and len(lines) == 1
