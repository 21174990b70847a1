"""``python -m trainer generate``: answer a prompt or a conversation with a trained adapter.

    python -m trainer generate --adapter output/demo/final --prompt "What is the weather in Paris?"
    python -m trainer generate --adapter output/demo/checkpoint-000100 --conversation chat.json

``--adapter`` is a directory written by training (``final/``, ``best/``, ``checkpoint-N/``, or the output
directory itself, which means its ``final/``): it holds the adapter and the resolved ``train_config.yaml``,
from which the base model is recreated (``demo``: the same random weights, seeded by the saved ``seed``).
Decoding is greedy by default and stops at the tokens that end a turn of the chat template (derived from
its rendering: GLM-4's ``<|user|>`` and ``<|observation|>``, ChatML's ``<|im_end|>``, Gemma 4's ``<turn|>``
and ``<|tool_response>``...), eos and the model's generation-config eos ids. ``--conversation`` takes a
JSON list of messages or a record of the training data (``{"messages": [...], "tools": [...]}``: tool
calls, ``tool`` messages and the tools included), read and rendered as training renders it; the answer is
the next assistant turn.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.config import ConfigError, load_config
from trainer.conversations import Conversation, Problem, as_record, normalize
from trainer.data import load_tokenizer
from trainer.model import ATTN_NAME, hf_reference_attention, native_lora_targets, prepare_model
from trainer.templates import resolve_template, token_id, turn_stops


class GenerateError(ValueError):
    """Bad adapter directory or conversation; the CLI prints it as one line."""


def stop_token_ids(tokenizer, model=None, template_kwargs=None) -> set[int]:
    """Ids that end an assistant turn: the tokens the chat template writes last in a turn, derived from its
    rendering (:func:`trainer.templates.turn_stops`, the stops training labels), the tokenizer's eos and
    every eos id of the model's generation config (its ``generation_config.json``)."""
    ids = {tid for t in turn_stops(tokenizer, template_kwargs) if (tid := token_id(tokenizer, t)) is not None}
    eos = [tokenizer.eos_token_id]
    if model is not None:
        eos.append(getattr(model.generation_config, "eos_token_id", None))
    for e in eos:
        ids.update(e if isinstance(e, list) else [] if e is None else [e])
    return ids


def prompt_ids(tokenizer, messages: list[dict], *, tools=None, template_kwargs=None) -> list[int]:
    """The conversation rendered with the tokenizer's chat template (with the record's ``tools`` and
    template keyword arguments, as training renders it), ending with the assistant's role."""
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """The name of the KV cache, in the forward's arguments and in its output: ``cache`` from transformers
    5.2x on, ``past_key_values`` before; using the old name on a new version prints a deprecation warning."""
    return "cache" if "cache" in inspect.signature(_base(model).forward).parameters else "past_key_values"


@contextmanager
def cached_attention(model):
    """Inside: ``model`` in eval mode with an attention that takes a KV cache and padding masks. A model
    switched to packed varlen attention (which wants cu_seqlens and no cache) is switched to sdpa for the
    block; its attention and training mode are restored after it."""
    base = _base(model)
    attn = base.config._attn_implementation
    if attn == ATTN_NAME:
        base.set_attn_implementation(hf_reference_attention(base))  # eager where sdpa lacks a feature
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        if attn == ATTN_NAME:
            base.set_attn_implementation(ATTN_NAME)


@torch.no_grad()
def generate_ids(
    model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
    generator: torch.Generator | None = None, tools=None, template_kwargs=None,
) -> list[int]:  # fmt: skip
    """New token ids after the prompt, the stop token excluded. Greedy when ``temperature`` is 0, else
    sampled from softmax(logits / temperature). Uses the KV cache with the model's default attention
    (see :func:`cached_attention`). ``tools`` and ``template_kwargs``: as a training record's."""
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerateError(f"temperature must not be negative, got {temperature}")
    with cached_attention(model):
        base = _base(model)
        device = base.get_input_embeddings().weight.device
        stops = stop_token_ids(tokenizer, base, template_kwargs)
        prompt = prompt_ids(tokenizer, messages, tools=tools, template_kwargs=template_kwargs)
        ids = torch.tensor([prompt], device=device)
        out: list[int] = []
        cache, cache_name = None, cache_argument(model)
        while len(out) < max_new_tokens:
            result = model(input_ids=ids, use_cache=True, **{cache_name: cache})
            cache = getattr(result, cache_name)
            logits = result.logits[0, -1].float()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            if token in stops:
                break
            out.append(token)
            ids = torch.tensor([[token]], device=device)
        return out


def generate(
    model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
    generator: torch.Generator | None = None, tools=None, template_kwargs=None,
) -> str:  # fmt: skip
    """The next assistant turn of ``messages`` (``[{"role": ..., "content": ...}, ...]``) as text."""
    ids = generate_ids(
        model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
        generator=generator, tools=tools, template_kwargs=template_kwargs,
    )  # fmt: skip
    return answer_text(tokenizer, ids)


def answer_text(tokenizer, ids: list[int]) -> str:
    """Generated ids as the answer's text: special tokens dropped, surrounding whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------- CLI


def resolve_adapter_dir(path: str | Path) -> Path:
    """The directory holding adapter_config.json and train_config.yaml (an output dir means its final/)."""
    path = Path(path)
    if not path.is_dir():
        raise GenerateError(f"--adapter {path}: no such directory; give an output or checkpoint directory")
    if not (path / "adapter_config.json").is_file() and (path / "final" / "adapter_config.json").is_file():
        path = path / "final"
    for name in ("adapter_config.json", "train_config.yaml"):
        if not (path / name).is_file():
            raise GenerateError(
                f"--adapter {path}: no {name}; give a directory written by training "
                "(final/, best/ or checkpoint-N/ of the output directory)"
            )
    return path


def saved_config(path: str | Path, *, device: str | None = None):
    """The resolved training config an adapter directory holds (``device``: overrides the saved one)."""
    path = resolve_adapter_dir(path)
    return load_config(
        ["--config", str(path / "train_config.yaml"), *(["--device", device] if device else [])]
    )


def load_adapter(path: str | Path, *, device: str | None = None, tokenizer=None):
    """(model, tokenizer, cfg): the base model recreated from the saved config, with the adapter loaded;
    ``tokenizer``: the saved config's, when already loaded."""
    from peft import PeftModel

    path = resolve_adapter_dir(path)
    cfg = saved_config(path, device=device)
    model, tokenizer, _ = prepare_model(cfg, for_training=False, tokenizer=tokenizer)
    with native_lora_targets():  # the adapter names the model's modules as they are
        model = PeftModel.from_pretrained(model, str(path)).eval()
    return model, tokenizer, cfg


def read_conversation(path: str | Path, *, template: str = "chat_template") -> Conversation:
    """The conversation of a JSON file: a list of messages, or one record of the training data (with
    ``tools``, ``chat_template_kwargs``, tool calls, ``tool`` / ``observation`` messages; ShareGPT too),
    validated and put in the form training renders for ``template`` (GLM-4's for ``glm4``). The last
    message must not be the assistant's (the answer is the next assistant turn)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GenerateError(f"--conversation {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerateError(f"--conversation {path}: not valid JSON ({e})") from None
    record = {"messages": data} if isinstance(data, list) else data
    if not isinstance(record, dict):
        raise GenerateError(f'--conversation {path}: expected a list of messages or {{"messages": [...]}}')
    try:
        conversation = normalize(as_record(record), glm4=template == "glm4")
    except Problem as e:
        raise GenerateError(f"--conversation {path}: {e}") from None
    if conversation.messages[-1]["role"] == "assistant":
        raise GenerateError(
            f"--conversation {path}: the last message is the assistant's; end with a user or tool message "
            "to get the next answer"
        )
    return conversation


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised to main instead of argparse's usage + exit
        raise GenerateError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trainer generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="output or checkpoint directory written by training")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single user message")
    source.add_argument("--conversation", help="JSON file: a list of messages or {'messages': [...]}")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--device", default=None, help="override the saved config's device (cpu, cuda, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    try:
        args = _parser().parse_args(argv)
        # the conversation is read and checked with the tokenizer alone, before the model loads
        cfg = saved_config(args.adapter, device=args.device)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
        template = resolve_template(cfg.template, tokenizer)
        if args.conversation is not None:
            conversation = read_conversation(args.conversation, template=template)
        else:
            conversation = Conversation([{"role": "user", "content": args.prompt}], [True])
        model, tokenizer, _ = load_adapter(args.adapter, device=args.device, tokenizer=tokenizer)
        ids = generate_ids(
            model, tokenizer, conversation.messages, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed),
            tools=conversation.tools, template_kwargs=conversation.kwargs,
        )  # fmt: skip
    except (GenerateError, ConfigError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    text = answer_text(tokenizer, ids)
    print(text)
    if not text:  # a blank line alone would read as if nothing happened
        raw = tokenizer.decode(ids, skip_special_tokens=False)
        why = f"{len(ids)} new tokens, none of them visible: {raw!r}" if ids else "the turn ended at once"
        print(f"(empty answer: {why})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
