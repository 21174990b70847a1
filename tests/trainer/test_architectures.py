"""`check`'s comparison on tiny random models of every supported architecture.

Each model is built from its transformers config (hidden 64, 2 layers, the demo tokenizer's vocabulary)
with its attention features switched on: sliding windows shorter than the conversations, Gemma 2's
attention and final softcaps, gpt-oss's sinks, Cohere's logit scale, Granite's logits scaling, SmolLM3's
NoPE layers, MoE layers. ``run_check`` then compares our packed/varlen/fused loss and LoRA gradients
with transformers' own padded path in fp32. Dropping a window, a softcap or the sinks from the packed
path makes the same comparison fail, so the tolerance is tight enough to see them.
"""

import functools
import importlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import trainer.check as check_module
import trainer.model as model_module
from trainer.check import run_check
from trainer.config import load_config
from trainer.data import load_tokenizer
from trainer.train import train
from tritrain_kernels.hf import use_masked_ce

WINDOW = 24  # keys; the conversations (max_length 160) are 56-160 tokens long, so every window cuts
COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=1024, attention_dropout=0.0, initializer_range=0.1,
)  # fmt: skip
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
TWO_KINDS = ["sliding_attention", "full_attention"]
ARCHS = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, **MOE),
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "gemma": {},
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=TWO_KINDS),
    "glm": {},
    "glm4": {},
    "glm4_moe": dict(
        n_routed_experts=4, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1, **MOE
    ),
    "phi3": dict(sliding_window=WINDOW),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, layer_types=TWO_KINDS),
    "cohere2": dict(sliding_window=WINDOW, layer_types=TWO_KINDS, logit_scale=0.5),
    "olmo2": {},
    "smollm3": dict(no_rope_layers=[1, 0]),  # layer 1 has no rotary embedding
    "granite": dict(logits_scaling=4.0, attention_multiplier=0.2, embedding_multiplier=2.0),
    # sets sliding_window on every layer; its forward windows only the layers with is_sliding
    "exaone4": dict(sliding_window=WINDOW, sliding_window_pattern=2, layer_types=TWO_KINDS),
    # MLA: q/k head dim 32 (16 without rotary + 16 rotary), v head dim 16, low-rank q and kv
    "deepseek_v3": dict(
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        **MOE,
    ),  # fmt: skip
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),  # a Linear router
    "seed_oss": dict(attention_dropout=0.1),  # trained without it, said once at start
    "nemotron": {},  # its decoder layer hands attention position_ids but not cu_seq_lens
}
FAST = ["--device", "cpu", "--tokenizer", "demo", "--max-tokens", "320", "--max-length", "160"]


def tiny_model(arch: str, *, seed: int = 0) -> torch.nn.Module:
    vocab = len(load_tokenizer("demo"))
    config = AutoConfig.for_model(arch, vocab_size=vocab, pad_token_id=0, eos_token_id=0, bos_token_id=0,
                                  **{**COMMON, **ARCHS[arch]})  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.Tensor):  # so that the sinks matter
                module.sinks.copy_(torch.linspace(-1.0, 2.0, module.sinks.numel()))
    return model


def _check(monkeypatch, arch: str, *argv: str, num_batches: int = 1) -> dict:
    """run_check on the tiny model of ``arch`` (prepare_model is handed the built model)."""
    model = tiny_model(arch)
    monkeypatch.setattr(
        check_module, "prepare_model", functools.partial(model_module.prepare_model, model=model)
    )
    cfg = load_config([*FAST, "--model", f"tiny-{arch}", "--lora-dropout", "0", *argv])
    return run_check(cfg, num_batches=num_batches)


# Unmarked: one model per feature (windows, mixed layers, both softcaps, sinks + MoE, logit scales, NoPE,
# MoE); the others (plain attention, covered feature-wise by these) are slow.
FEATURED = {"mistral", "gemma2", "gemma3_text", "gpt_oss", "cohere2", "granite", "smollm3", "qwen3_moe",
            "exaone4", "deepseek_v3", "phimoe", "nemotron"}  # fmt: skip
ALL = [a if a in FEATURED else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]


@pytest.mark.parametrize("arch", ALL)
def test_check_passes(monkeypatch, arch):
    r = _check(monkeypatch, arch)
    assert r["passed"], r
    assert r["conversations"] >= 2 and r["loss_tokens"] > 0 and r["worst_param"]


def _drop(feature: str):
    """The packed path with one feature silently dropped: the defect the dispatcher must never have."""
    real = model_module.varlen_attention

    def dropped(*args, **kwargs):
        return real(*args, **{**kwargs, feature: None})

    return dropped


@pytest.mark.parametrize(
    "arch, feature",
    [("mistral", "window"), ("gemma2", "softcap"), ("gpt_oss", "sinks"), ("gemma3_text", "window")],
)
def test_check_fails_when_a_feature_is_dropped(monkeypatch, arch, feature):
    monkeypatch.setattr(model_module, "varlen_attention", _drop(feature))
    r = _check(monkeypatch, arch)
    assert not r["passed"], r
    assert max(r["loss_rel_diff"], r["grad_rel_diff"]) > 10 * r["tolerance"]


def test_the_plan_names_each_layer_kind(monkeypatch, capsys):
    lines = model_module.enable_varlen_attention(tiny_model("gpt_oss"), "auto")
    assert lines == [
        f"attention layers 0: reference (causal, window {WINDOW}, sinks)",
        "attention layers 1: reference (causal, sinks)",
    ]
    lines = model_module.enable_varlen_attention(tiny_model("gemma2"), "reference")
    assert lines == [
        f"attention layers 0: reference (causal, window {WINDOW}, softcap 1)",
        "attention layers 1: reference (causal, softcap 1)",
    ]


def test_forced_backend_without_a_layer_feature_is_refused_at_start(monkeypatch):
    va = importlib.import_module("tritrain_kernels.varlen_attention")  # the package attribute is the function
    monkeypatch.setitem(va._unavailable_cache, "torch_varlen", None)  # as if installed, with a GPU
    with pytest.raises(ValueError, match="'torch_varlen' cannot run this layer"):
        model_module.enable_varlen_attention(tiny_model("gemma2"), "torch_varlen")


def test_planned_and_asked_features_must_agree():
    model = tiny_model("mistral")
    model_module.enable_varlen_attention(model, "auto")
    model.config.sliding_window = 7  # what the forward passes now differs from what was planned
    ids = torch.arange(10)[None]
    with pytest.raises(RuntimeError, match="planned as .*window 24.* asks for .*window=7"):
        model.model(input_ids=ids, position_ids=ids, cu_seq_lens_q=torch.tensor([0, 10], dtype=torch.int32),
                    cu_seq_lens_k=torch.tensor([0, 10], dtype=torch.int32), max_length_q=10, max_length_k=10,
                    use_cache=False)  # fmt: skip


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attention_chunk_size", 64, "config.attention_chunk_size=64 \\(chunked local attention\\)"),
    ],
)
def test_unexpressible_attention_is_refused_naming_the_field(field, value, message):
    model = tiny_model("llama")
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=message):
        model_module.check_attention_supported(model)


def test_check_on_gemma2_without_attention_softcap_uses_an_attention_the_class_supports(monkeypatch):
    monkeypatch.setitem(ARCHS, "gemma2", dict(sliding_window=WINDOW, attn_logit_softcapping=None))
    assert model_module.hf_reference_attention(tiny_model("gemma2")) == "eager"  # Gemma 2 has no sdpa
    r = _check(monkeypatch, "gemma2")
    assert r["passed"], r


def test_the_plan_comes_from_what_each_layer_passes():
    """EXAONE 4 sets sliding_window on every layer and windows only those with is_sliding: reading the
    attribute planned a window on its full-attention layer, which the runtime guard then refused."""
    model = tiny_model("exaone4")
    lines = model_module.enable_varlen_attention(model, "auto")
    assert all(m.sliding_window == WINDOW for _, m in model_module.attention_modules(model))
    assert lines == [
        "attention layers 0: reference (causal, window 24)",
        "attention layers 1: reference (causal)",
    ]


def test_attention_dropout_is_left_out_with_one_line_or_refused():
    model = tiny_model("seed_oss")
    lines = model_module.enable_varlen_attention(model, "auto")
    assert any(line.startswith("attention dropout 0.1 (the model's config) is left out") for line in lines)
    refused = r"attention dropout 0\.1, which packed attention does not apply"
    with pytest.raises(ValueError, match=refused) as ei:
        model_module.enable_varlen_attention(tiny_model("seed_oss"), "auto", dropout="refuse")
    assert "\n" not in str(ei.value)


def test_mla_pads_values_to_the_query_head_dim():
    lines = model_module.enable_varlen_attention(tiny_model("deepseek_v3"), "auto")
    assert lines == ["attention layers 0-1: reference (causal)"]  # head dim 32 for q/k, 16 for v


@pytest.mark.parametrize(
    "arch, kind", [("nemotron_h", "NemotronHMamba2Mixer"), ("falcon_h1", "FalconH1Mixer")]
)
def test_hybrids_are_refused_naming_the_other_layer_kind(arch, kind):
    vocab = len(load_tokenizer("demo"))
    config = AutoConfig.for_model(arch, vocab_size=vocab, **{**COMMON, "num_hidden_layers": 4})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=f"has .*{kind}.* layers besides attention") as ei:
        model_module.enable_varlen_attention(model, "auto")
    assert "\n" not in str(ei.value) and "AttentionInterface" not in str(ei.value)


def test_boundaries_come_from_position_ids_where_the_layer_drops_cu_seqlens(monkeypatch):
    """Nemotron's decoder layer calls its attention without the decoder's keyword arguments: refused at run
    time before (no cu_seq_lens_q), now read from position_ids; one sequence per row instead fails check."""
    lines = model_module.enable_varlen_attention(tiny_model("nemotron"), "auto")
    assert lines[-1].startswith("attention layers 0-1: their decoder layers pass no cu_seq_lens on")
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, max_len = model_module._bounds_from_positions(positions)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and max_len == 4
    monkeypatch.setattr(
        model_module, "_bounds_from_positions", lambda p: (torch.tensor([0, p.shape[1]]), p.shape[1])
    )
    r = _check(monkeypatch, "nemotron")
    assert not r["passed"] and r["loss_rel_diff"] > 10 * r["tolerance"], r


def _tiny(arch: str, **fields) -> torch.nn.Module:
    vocab = len(load_tokenizer("demo"))
    ids = dict(pad_token_id=0, eos_token_id=0, bos_token_id=0)
    config = AutoConfig.for_model(arch, vocab_size=vocab, **ids, **{**COMMON, **fields})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def test_a_layer_that_builds_its_own_mask_is_refused_at_start():
    """Doge adds a learned bias per key through the mask it builds: refused at run time before."""
    with pytest.raises(ValueError, match=r"DogeAttention \(layer 0\) builds its own attention mask") as ei:
        model_module.enable_varlen_attention(_tiny("doge"), "auto")
    assert "\n" not in str(ei.value)


def test_a_layer_handed_no_boundaries_at_all_is_refused_at_start():
    module = torch.nn.Linear(1, 1)
    setattr(module, model_module._PROBED_ATTR, dict(varlen=False, positions=False, mask=False))
    with pytest.raises(
        ValueError, match=r"Linear \(layer 3\) is handed neither cu_seq_lens_q/k nor position_ids"
    ):
        model_module._refuse_unpackable(3, module)


@pytest.mark.parametrize("arch, width", [("electra", 128), ("rembert", 256)])
def test_a_head_fed_by_a_projection_is_refused_in_one_line(arch, width):
    """ELECTRA and RemBERT project the final hidden states to another width before lm_head: a shape error
    inside the head check before."""
    model = _tiny(arch, embedding_size=width, output_embedding_size=width)
    message = f"not lm_head\\(final hidden states\\): lm_head takes {width} features, .* have 64"
    with pytest.raises(ValueError, match=message) as ei:
        model_module.lm_head_spec(model)
    assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match=f"lm_head takes {width} features"):
        use_masked_ce(model)


def test_a_head_with_more_rows_than_input_tokens_is_checked_on_tokens_that_exist():
    """Inkling 2's lm_head has more rows than its embedding (``unpadded_vocab_size``): the head check drew
    ids from the head's rows, an IndexError in the embedding before."""
    model = tiny_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(64, model.config.vocab_size + 500, bias=False)
    spec = model_module.lm_head_spec(model)
    assert spec.weight.shape == (model.config.vocab_size + 500, 64)
    use_masked_ce(model)


def test_a_get_decoder_that_is_not_the_decoder_is_passed_over():
    """ModernBERT-decoder keeps its vocabulary projection in ``self.decoder``, which get_decoder() returns:
    called with input_ids before; now the base model is the decoder, and its head (dense, norm, then the
    projection) is refused in one line."""
    model = _tiny("modernbert-decoder")
    assert type(model.get_decoder()) is torch.nn.Linear
    assert model_module.decoder_of(model) is model.model
    with pytest.raises(ValueError, match=r"the model's logits are not lm_head\(final hidden states\)"):
        model_module.lm_head_spec(model)
    with pytest.raises(ValueError, match=r"the logits are not lm_head\(final hidden states\)"):
        use_masked_ce(model)


# ----------------------------------------------------------------------------------------- MoE and LoRA


def _adapted(model) -> set[str]:
    return {n.split(".base_layer")[0] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe", "mixtral", "gpt_oss", "phimoe"])
def test_default_lora_targets_on_moe_adapt_attention_and_dense_projections(arch):
    cfg = load_config([*FAST, "--model", "x"])  # default targets (all-linear) and dropout (0.1)
    model = model_module.apply_lora(tiny_model(arch), cfg)
    adapted = {n.rsplit(".lora_", 1)[0].split("base_model.model.")[-1] for n in _adapted(model)}
    assert not any(".experts." in n and "shared" not in n for n in adapted), adapted
    assert not any(n.endswith(("mlp.gate", "router")) for n in adapted), adapted
    kinds = {n.rsplit(".", 1)[-1] for n in adapted}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= kinds
    if arch == "glm4_moe":  # its dense first layer and shared experts are nn.Linear
        assert "model.layers.0.mlp.down_proj" in adapted
        assert "model.layers.1.mlp.shared_experts.down_proj" in adapted


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_expert_targets_with_dropout(arch):
    cfg = load_config([*FAST, "--model", "x", "--lora-target-experts", "true", "--lora-dropout", "0.1"])
    model = model_module.apply_lora(tiny_model(arch), cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in names) and any("q_proj" in n for n in names)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.1]
    assert len(dropouts) >= 4 * COMMON["num_hidden_layers"]  # every attention projection keeps its dropout


def test_expert_targets_on_a_dense_model_are_refused():
    cfg = load_config([*FAST, "--model", "x", "--lora-target-experts", "true"])
    with pytest.raises(ValueError, match="lora_target_experts: LlamaForCausalLM has no stacked expert"):
        model_module.apply_lora(tiny_model("llama"), cfg)


def test_check_passes_with_expert_targets(monkeypatch):
    r = _check(monkeypatch, "qwen3_moe", "--lora-target-experts", "true")
    assert r["passed"], r


def test_lora_on_the_router_is_refused_in_one_line():
    cfg = load_config([*FAST, "--model", "x", "--lora-target-modules", "q_proj,router"])
    routers = model_module.router_modules(tiny_model("phimoe"))
    assert routers == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    with pytest.raises(ValueError, match="names router, the MoE router: routers never get LoRA"):
        model_module.apply_lora(tiny_model("phimoe"), cfg)


def test_a_linear_that_returns_no_tensor_is_never_wrapped_even_unnamed(monkeypatch):
    """PhiMoE's router returns a tuple; with the router-by-name rule switched off, the probe forward still
    finds it: ``all-linear`` leaves it out (training would crash inside PEFT) and naming it is one line."""
    monkeypatch.setattr(model_module, "router_modules", lambda model: [])
    model = tiny_model("phimoe")
    model_module.enable_varlen_attention(model, "auto")
    assert model_module.non_tensor_linears(model) == {
        "model.layers.0.mlp.router": "tuple", "model.layers.1.mlp.router": "tuple"
    }  # fmt: skip
    adapted = _adapted(model_module.apply_lora(model, load_config([*FAST, "--model", "x"])))
    assert not any("router" in name for name in adapted) and any("q_proj" in name for name in adapted)
    model = tiny_model("phimoe")
    model_module.enable_varlen_attention(model, "auto")
    cfg = load_config([*FAST, "--model", "x", "--lora-target-modules", "q_proj,router"])
    with pytest.raises(
        ValueError, match=r"names router, but model.layers.0.mlp.router \(\w+\) returns a tuple"
    ):
        model_module.apply_lora(model, cfg)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "phimoe"])
def test_one_training_step_with_default_lora_targets(monkeypatch, tmp_path, arch):
    model = tiny_model(arch)
    import trainer.train as train_module

    monkeypatch.setattr(
        train_module, "prepare_model", functools.partial(model_module.prepare_model, model=model)
    )
    argv = ["--model", f"tiny-{arch}", "--max-steps", "1", "--val-file", "", "--output-dir", str(tmp_path)]
    cfg = load_config([*FAST, *argv])
    result = train(cfg)
    assert result["steps"] == 1 and torch.isfinite(torch.tensor(result["first_loss"]))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_saved_moe_adapter_loads_back_onto_the_same_modules(tmp_path):
    from peft import PeftModel

    cfg = load_config([*FAST, "--model", "x", "--lora-dropout", "0"])
    model = model_module.apply_lora(tiny_model("glm4_moe"), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    with model_module.native_lora_targets():
        loaded = PeftModel.from_pretrained(tiny_model("glm4_moe"), str(tmp_path)).eval()
    lora = [{n for n, _ in m.named_parameters() if "lora_" in n} for m in (model, loaded)]
    assert lora[0] == lora[1] and not any(".experts." in n and "shared" not in n for n in lora[1])
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_forced_backend_that_cannot_run_is_one_line_at_start(capsys, monkeypatch, tmp_path):
    from trainer.__main__ import main

    va = importlib.import_module("tritrain_kernels.varlen_attention")
    monkeypatch.setitem(va._unavailable_cache, "flash_attn", None)  # as if installed, with a GPU
    argv = ["--device", "cpu", "--attn-backend", "flash_attn", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'flash_attn' cannot run this layer" in err and "fp16/bf16 CUDA" in err


@pytest.mark.slow  # ~1 min each in Triton's interpreter
@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "deepseek_v3"])  # deepseek_v3: MLA, v padded
def test_check_passes_with_the_triton_kernel(monkeypatch, arch):
    """The project's Triton kernel (Triton's interpreter on CPU) on every feature of a real model."""
    va = importlib.import_module("tritrain_kernels.varlen_attention")
    if va._unavailable_reason("triton") is not None:
        pytest.skip(f"triton: {va._unavailable_reason('triton')}")
    r = _check(monkeypatch, arch, "--attn-backend", "triton")
    assert r["passed"], r
