import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import trainer.generate as gen
from trainer.__main__ import main as trainer_main
from trainer.config import load_config
from trainer.data import DEMO_VAL_FILE, encode_file
from trainer.model import ATTN_NAME, enable_varlen_attention, lm_head_spec, load_model
from trainer.packing import make_packed_batches
from trainer.train import evaluate, train
from tritrain_kernels import masked_linear_cross_entropy

FAST = ["--device", "cpu", "--max-tokens", "256", "--max-length", "256", "--lr", "5e-3"]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"
    cfg = load_config([*FAST, "--max-steps", "2", "--eval-every", "2", "--save-every", "2",
                       "--output-dir", str(out)])  # fmt: skip
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def base_model():
    model, tokenizer = load_model(load_config(FAST))
    return model.eval(), tokenizer


@torch.no_grad()
def argmax_loop(model, tokenizer, messages, max_new_tokens, stops=()):
    """Reference: the full sequence through the model at every step (no cache), argmax of the last logits."""
    ids = gen.prompt_ids(tokenizer, messages)
    out = []
    while len(out) < max_new_tokens:
        token = int(model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
    return out


def test_adapter_reloads_the_trained_model_exactly(demo_run):
    """The validation loss of base + adapter recreated from best/ equals the one measured in training,
    so the demo's random base weights are reproduced from the saved config."""
    cfg, result = demo_run
    model, tokenizer, saved_cfg = gen.load_adapter(Path(cfg.output_dir) / "best")
    assert saved_cfg == dataclasses.replace(cfg, template="glm4")  # saved resolved: auto is glm4 for the demo
    head = lm_head_spec(model, check=False)
    val, _ = encode_file(DEMO_VAL_FILE, tokenizer, max_length=cfg.max_length, progress=False)
    batches = make_packed_batches(val, cfg.max_tokens)
    enable_varlen_attention(model)
    loss = evaluate(model, batches, head, masked_linear_cross_entropy, torch.device("cpu"), nullcontext())
    assert loss == pytest.approx(result["best_val_loss"], rel=1e-5)
    with model.disable_adapter():  # the adapter matters: without it the loss is another number
        plain = evaluate(
            model, batches, head, masked_linear_cross_entropy, torch.device("cpu"), nullcontext()
        )
    assert abs(plain - loss) > 1e-3

    # generation switches the varlen model to sdpa for the call and back after it
    text = gen.generate(model, tokenizer, MESSAGES, max_new_tokens=4)
    assert isinstance(text, str)
    assert model.get_base_model().config._attn_implementation == ATTN_NAME


def test_greedy_equals_argmax_loop(demo_run):
    cfg, _ = demo_run
    model, tokenizer, _ = gen.load_adapter(cfg.output_dir)  # the output dir means its final/
    stops = gen.stop_token_ids(tokenizer, model.get_base_model())
    messages = [{"role": "system", "content": "You are helpful."}, *MESSAGES]
    ids = gen.generate_ids(model, tokenizer, messages, max_new_tokens=12)
    assert ids == argmax_loop(model, tokenizer, messages, 12, stops)
    text = gen.generate(model, tokenizer, messages, max_new_tokens=12)
    assert text == tokenizer.decode(ids, skip_special_tokens=True).strip()
    # a temperature this low samples the argmax
    sampled = gen.generate_ids(model, tokenizer, messages, max_new_tokens=12, temperature=1e-4,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert sampled == ids


def test_glm4_stop_tokens(base_model):
    _, tokenizer = base_model
    vocab = tokenizer.get_vocab()
    stops = gen.stop_token_ids(tokenizer)
    assert {vocab["<|user|>"], vocab["<|observation|>"], tokenizer.eos_token_id} <= stops
    assert vocab["<|assistant|>"] not in stops


@pytest.mark.parametrize(
    "token, stops",
    [("<|user|>", True), ("<|observation|>", True), ("<|endoftext|>", True), ("<|assistant|>", False)],
)
def test_stop_token_ends_generation(base_model, token, stops):
    """Make ``token`` the argmax from the third step on (its lm_head row becomes twice the row of the token
    greedy decoding picks there); a stop token must end the answer there, another token must not."""
    model, tokenizer = base_model
    plain = argmax_loop(model, tokenizer, MESSAGES, 3)
    head = model.get_output_embeddings().weight
    tid = tokenizer.get_vocab()[token]
    saved = head.data[tid].clone()
    try:
        head.data[tid] = 2 * head.data[plain[2]]
        reference = argmax_loop(model, tokenizer, MESSAGES, 10)
        assert tid in reference  # the edit worked: the token is generated
        ids = gen.generate_ids(model, tokenizer, MESSAGES, max_new_tokens=10)
    finally:
        head.data[tid] = saved
    first = reference.index(tid)
    if stops:
        assert ids == reference[:first] and len(ids) < 10
    else:
        assert ids == reference and len(ids) == 10


def test_cli(demo_run, tmp_path, capsys):
    cfg, _ = demo_run
    final = str(Path(cfg.output_dir) / "final")
    assert trainer_main(["generate", "--adapter", final, "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    model, tokenizer, _ = gen.load_adapter(final)
    expected = gen.generate(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert out.strip() == expected

    conv = tmp_path / "chat.json"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert gen.main(["--adapter", final, "--conversation", str(conv), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "/no/such/dir", "--prompt", "hi"], "no such directory"),
        (["--adapter", "{final}", "--prompt", "hi", "--conversation", "x.json"], "not allowed with"),
        (["--adapter", "{final}"], "one of the arguments --prompt --conversation is required"),
        (["--adapter", "{final}", "--conversation", "/no/such.json"], "no such file"),
        (["--adapter", "{final}", "--conversation", "{assistant_last}"], "last message is the assistant's"),
        (["--adapter", "{final}", "--prompt", "hi", "--max-new-tokens", "0"], "at least 1"),
        (["--adapter", "{ckpt_parent}", "--prompt", "hi"], "no adapter_config.json"),
    ],
)
def test_cli_errors(demo_run, tmp_path, capsys, args, message):
    cfg, _ = demo_run
    assistant_last = tmp_path / "a.json"
    assistant_last.write_text(
        json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}])
    )
    fill = dict(
        final=str(Path(cfg.output_dir) / "final"),
        assistant_last=str(assistant_last),
        ckpt_parent=str(tmp_path),
    )
    assert gen.main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_generate_prints_no_deprecation_warning(demo_run, capsys):
    """Neither Python warnings nor transformers' logged ones (which go to stderr) from our own calls; PEFT's
    own call of a deprecated transformers function is PEFT's (trainer/__init__.py silences it)."""
    import warnings

    cfg, _ = demo_run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = trainer_main(
            ["generate", "--adapter", cfg.output_dir, "--prompt", "Hi"] + ["--max-new-tokens", "2"]
        )
    assert rc == 0
    ours = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert not [m for m in ours if "deprecat" in m.lower()], ours
    assert "deprecated" not in capsys.readouterr().err.lower()


TOOL_RECORD = {
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object", "properties": {}}}}],
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temperature": 21}'},
    ],
}  # fmt: skip


def test_cli_takes_a_conversation_in_the_training_format_with_tools(demo_run, tmp_path, capsys):
    """A tool-calling record of the training data (tools, tool calls, a tool message) is rendered as
    training renders it, tools included, and answered; it used to be refused for its tool role."""
    cfg, _ = demo_run
    final = str(Path(cfg.output_dir) / "final")
    conv = tmp_path / "tool.json"
    conv.write_text(json.dumps(TOOL_RECORD))
    assert gen.main(["--adapter", final, "--conversation", str(conv), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out

    conversation = gen.read_conversation(conv, template="glm4")  # the demo trains with GLM-4's rule
    model, tokenizer, saved = gen.load_adapter(final)
    assert saved.template == "glm4"
    prompt = tokenizer.decode(gen.prompt_ids(tokenizer, conversation.messages, tools=conversation.tools))
    assert "## get_weather" in prompt and '{"temperature": 21}' in prompt and "<|observation|>" in prompt
    expected = gen.generate(model, tokenizer, conversation.messages, max_new_tokens=3)
    assert out.rstrip("\n") == expected

    chat = gen.read_conversation(conv)  # a chat template's form: tools apart, OpenAI tool calls kept
    assert chat.tools == TOOL_RECORD["tools"] and chat.messages[-1]["role"] == "tool"
    assert chat.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_cli_conversation_errors_name_the_message(demo_run, tmp_path, capsys):
    cfg, _ = demo_run
    conv = tmp_path / "bad.json"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot"}]}))
    assert gen.main(["--adapter", cfg.output_dir, "--conversation", str(conv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --conversation {conv}: message 2: unknown role 'robot'"), err
    assert "\n" not in err


def test_cli_says_when_the_answer_is_empty(demo_run, monkeypatch, capsys):
    """A whitespace-only answer printed as a blank line looked like nothing happened."""
    cfg, _ = demo_run
    _, tokenizer, _ = gen.load_adapter(cfg.output_dir)
    blank = tokenizer(" \n ", add_special_tokens=False).input_ids
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: blank)
    assert gen.main(["--adapter", cfg.output_dir, "--prompt", "hi"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n"
    assert f"(empty answer: {len(blank)} new tokens, none of them visible: ' \\n ')" in captured.err
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: [])
    assert gen.main(["--adapter", cfg.output_dir, "--prompt", "hi"]) == 0
    assert "(empty answer: the turn ended at once)" in capsys.readouterr().err


# ------------------------------------------------------------------------- stops derived from the template


def test_stop_tokens_are_derived_from_the_chat_template(base_model):
    """No list: the demo's GLM-4 template ends a turn with the next role token; Gemma 4's ends a tool call
    with <|tool_response>; evaluation stops where generation does."""
    import trainer.evalgen as evalgen
    from tests.trainer.test_templates import family_tokenizer

    _, tokenizer = base_model
    assert set(tokenizer.convert_ids_to_tokens(sorted(gen.stop_token_ids(tokenizer)))) == {
        "<|user|>", "<|observation|>", tokenizer.eos_token
    }  # fmt: skip
    gemma4 = family_tokenizer("gemma4")
    stops = set(gemma4.convert_ids_to_tokens(sorted(gen.stop_token_ids(gemma4))))
    assert stops == {"<turn|>", "<|tool_response>"}
    assert evalgen.stop_token_ids is gen.stop_token_ids


def test_gemma4_tool_call_answer_ends_at_tool_response():
    """A model with Gemma 4's template stops its tool-call answer at <|tool_response>, as serving engines
    do: the token is made the argmax from the third step on (its lm_head row twice that of the token
    greedy decoding picks there); <tool_call|>, which is no stop, is generated through."""
    from tests.trainer.test_templates import TOOLS, family_tokenizer

    tokenizer = family_tokenizer("gemma4")
    model, tokenizer = load_model(load_config(FAST), tokenizer=tokenizer)  # the demo sized to its vocabulary
    model.eval()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    assert gen.prompt_ids(tokenizer, messages, tools=TOOLS)  # Gemma 4's prompt renders
    plain = argmax_loop(model, tokenizer, messages, 3)
    head = model.get_output_embeddings().weight
    for token, stops in (("<tool_call|>", False), ("<|tool_response>", True)):
        tid = tokenizer.convert_tokens_to_ids(token)
        saved = head.data[tid].clone()
        try:
            head.data[tid] = 2 * head.data[plain[2]]
            reference = argmax_loop(model, tokenizer, messages, 10)
            assert tid in reference
            ids = gen.generate_ids(model, tokenizer, messages, max_new_tokens=10)
        finally:
            head.data[tid] = saved
        assert ids == (reference[: reference.index(tid)] if stops else reference)
