"""Validation by generation (trainer/evalgen.py): the metrics against plain references on hand-made strings,
batched greedy generation against trainer/generate.py's one-at-a-time generation, a tiny model trained to
a fixed answer (exact match 1.0, best/ chosen by the metric), a model that never stops, and the choice of
the best evaluation with the over-fitting guard."""

import json
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

import trainer.evalgen as ev
import trainer.generate as gen
from trainer.config import ConfigError, load_config
from trainer.data import DEMO_VAL_FILE, encode_file
from trainer.model import ATTN_NAME, enable_varlen_attention, lm_head_spec
from trainer.packing import make_packed_batches
from trainer.train import evaluate, train
from tritrain_kernels import masked_linear_cross_entropy

ANSWER = "The password is swordfish."

# ------------------------------------------------------------------------- references: plain and slow


def levenshtein_ref(a: str, b: str) -> int:
    """The textbook table: d[i][j] = distance between a[:i] and b[:j]."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def has_loop_ref(seq, repeats: int, span: int) -> bool:
    """Some block seq[i:i+p], written out again and again from i, matches seq for max(repeats*p, span)."""
    seq = list(seq)
    for p in range(1, len(seq) + 1):
        length = max(repeats * p, span)
        for i in range(len(seq) - length + 1):
            if seq[i : i + length] == (seq[i : i + p] * length)[:length]:
                return True
    return False


def _random_text(rng: random.Random, alphabet: str, longest: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


# --------------------------------------------------------------------------------------------- metrics

PAIRS = [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("intention", "execution", 5), ("", "abc", 3),
         ("abc", "", 3), ("", "", 0), ("same", "same", 0), ("北京今天晴", "北京今天多云", 2),
         ("a" * 70 + "b", "b" + "a" * 70, 2), ("sunday", "saturday", 3)]  # fmt: skip


@pytest.mark.parametrize(("a", "b", "distance"), PAIRS)
def test_edit_distance_on_hand_made_pairs(a, b, distance):
    assert levenshtein_ref(a, b) == distance  # the reference itself, on textbook examples
    assert ev.edit_distance(a, b) == distance
    assert ev.edit_distance(b, a) == distance


def test_edit_distance_and_similarity_match_the_reference_on_random_strings():
    rng = random.Random(0)
    for _ in range(400):  # lengths across 64 bits, repeated letters, one string much longer
        a, b = _random_text(rng, "abc ", 90), _random_text(rng, "abcd世 ", 30)
        assert ev.edit_distance(a, b) == levenshtein_ref(a, b), (a, b)
        na, nb = " ".join(a.split()), " ".join(b.split())
        want = 1 - levenshtein_ref(na, nb) / max(len(na), len(nb)) if max(len(na), len(nb)) else 1.0
        assert ev.similarity(a, b) == pytest.approx(want)


def test_exact_match_similarity_and_length_ratio_on_hand_made_strings():
    assert ev.exact_match("  Paris.\n", "Paris.")
    assert ev.exact_match("It is  sunny\n\tin Rome.", "It is sunny in Rome.")
    assert not ev.exact_match("Paris .", "Paris.")
    assert not ev.exact_match("paris.", "Paris.")
    assert ev.similarity("The  capital\n", "The capital") == 1.0
    assert ev.similarity("", "") == 1.0
    assert ev.similarity("abc", "xyz") == 0.0
    assert ev.similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert ev.length_ratio("ab", "abcd") == 0.5
    assert ev.length_ratio("  a   b ", "a b") == 1.0
    assert ev.length_ratio("abc", "") == 3.0


# "It is sunny. It is sunny. It is sunny." is 2 copies of 13 characters and 12 of a third: no loop
LOOPS = [("abcabcabc", 3, 9, True), ("abcabcabc", 3, 10, False), ("abcabcab", 3, 8, False),
         ("It is sunny. " * 3, 3, 24, True), ("It is sunny. It is sunny. It is sunny.", 3, 24, False),
         ("It is sunny. " * 4, 3, 24, True), ("Sure: 8, 9, 10, 11, 12, 13, 14.", 3, 24, False),
         ("a" * 24, 3, 24, True), ("a" * 23, 3, 24, False), ("x" + "ab" * 12 + "y", 3, 24, True),
         ("The capital ofThe capital ofThe capital of", 3, 24, True),
         ("It is sunny. It is sunny.", 3, 24, False), ("", 3, 24, False), ([7, 8, 9] * 3, 3, 9, True),
         ([7, 8, 9] * 3 + [1], 4, 9, False)]  # fmt: skip


@pytest.mark.parametrize(("seq", "repeats", "span", "loop"), LOOPS)
def test_loops_on_hand_made_strings(seq, repeats, span, loop):
    assert has_loop_ref(seq, repeats, span) == loop
    assert ev.has_loop(seq, repeats=repeats, span=span) == loop


def test_loops_match_the_reference_on_random_strings():
    rng = random.Random(1)
    for _ in range(300):
        text = _random_text(rng, rng.choice(["ab", "abc", "abcdef"]), 40)
        repeats, span = rng.choice([2, 3, 4]), rng.choice([1, 6, 12])
        assert ev.has_loop(text, repeats=repeats, span=span) == has_loop_ref(text, repeats, span), text


def test_the_generation_metrics_are_means_over_answers():
    answers = [("Paris.", "Paris.", True), ("Rome " * 10, "Rome.", False), ("", "Berlin.", True),
               ("Madrid", "Madrid.", True)]  # fmt: skip
    scores = [ev.answer_scores(out, ref, stopped) for out, ref, stopped in answers]
    metrics = ev.score_answers(scores)
    assert metrics["exact_match"] == 0.25
    assert metrics["stop_rate"] == 0.75
    assert metrics["repetition"] == 0.25  # "Rome Rome Rome ...": 10 copies of "Rome ", 49 characters
    assert metrics["length_ratio"] == pytest.approx((1 + 49 / 5 + 0 + 6 / 7) / 4)
    sims = [1.0, 1 - levenshtein_ref("Rome " * 9 + "Rome", "Rome.") / 49, 0.0, 1 - 1 / 7]
    assert metrics["similarity"] == pytest.approx(sum(sims) / 4)


# ------------------------------------------------------------------ a tiny model trained to a fixed answer


def _conversation(i: int) -> dict:
    question = ["What is the password?", "Tell me the password, please.", "I forgot the password."][i % 3]
    return {"messages": [{"role": "user", "content": f"{question} (request {i})"},
                         {"role": "assistant", "content": ANSWER}]}  # fmt: skip


def _write(path: Path, conversations: list[dict]) -> None:
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))


@pytest.fixture(scope="module")
def fixed_answer(tmp_path_factory):
    """The demo model trained for 30 steps on conversations that all end with the same answer; every 5
    steps 4 validation conversations are answered and best/ follows exact match."""
    tmp = tmp_path_factory.mktemp("evalgen")
    _write(tmp / "train.jsonl", [_conversation(i) for i in range(32)])
    _write(tmp / "val.jsonl", [_conversation(100 + i) for i in range(4)])
    cfg = load_config(["--device", "cpu", "--max-tokens", "256", "--max-length", "256", "--lr", "1e-2",
                       "--warmup", "3", "--max-steps", "30", "--log-every", "5", "--eval-every", "5",
                       "--save-every", "0", "--train-file", str(tmp / "train.jsonl"),
                       "--val-file", str(tmp / "val.jsonl"), "--eval-generate", "4",
                       "--eval-max-new-tokens", "24", "--metric-for-best", "exact_match",
                       "--output-dir", str(tmp / "out")])  # fmt: skip
    return cfg, train(cfg)


def _records(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_exact_match_reaches_one_and_best_follows_it(fixed_answer):
    cfg, result = fixed_answer
    out = Path(cfg.output_dir)
    evals = [r for r in _records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20, 25, 30]
    assert evals[0]["exact_match"] < 1.0 and max(r["exact_match"] for r in evals) == 1.0
    assert all(r["gen_seconds"] > 0 for r in evals)
    # best/: the highest exact match, the lowest validation loss among those
    want = max(evals, key=lambda r: (r["exact_match"], -r["val_loss"]))
    assert result["best_step"] == want["step"] and result["best_val_loss"] == want["val_loss"]

    # the adapter in best/ is that evaluation's: same validation loss, and it answers every prompt exactly
    model, tokenizer, _ = gen.load_adapter(out / "best")
    val, _ = encode_file(cfg.val_file, tokenizer, max_length=cfg.max_length, progress=False)
    enable_varlen_attention(model)
    loss = evaluate(model, make_packed_batches(val, cfg.max_tokens), lm_head_spec(model, check=False),
                    masked_linear_cross_entropy, torch.device("cpu"), nullcontext())  # fmt: skip
    assert loss == pytest.approx(want["val_loss"], rel=1e-5)
    for i in range(4):
        messages = _conversation(100 + i)["messages"][:1]
        assert gen.generate(model, tokenizer, messages, max_new_tokens=24) == ANSWER

    samples = _records(out, "eval_samples.jsonl")
    assert len(samples) == 6 * 4
    assert [(s["step"], s["prompt"]) for s in samples] == [(r["step"], i) for r in evals for i in range(4)]
    assert all(s["reference"] == ANSWER for s in samples)
    assert [s["output"] for s in samples if s["step"] == want["step"]] == [ANSWER] * 4


def test_batched_generation_equals_one_at_a_time(fixed_answer):
    """Prompts of different lengths in one left-padded batch give generate_ids' tokens, on the trained
    adapter (which stops) and on the random base model (which does not), with the model in its training
    state (varlen attention), which generation switches away from and back to."""
    cfg, _ = fixed_answer
    model, tokenizer, _ = gen.load_adapter(Path(cfg.output_dir) / "best")
    stops = gen.stop_token_ids(tokenizer, model.get_base_model())
    trained = [_conversation(200 + i)["messages"][:1] for i in range(3)]
    demo = [json.loads(line)["messages"] for line in DEMO_VAL_FILE.read_text().splitlines()[:40]]
    short = [m[: max(i for i, x in enumerate(m) if x["role"] == "assistant")] for m in demo]
    untrained = sorted(short, key=lambda m: len(gen.prompt_ids(tokenizer, m)))[:3]  # 75-94 tokens
    enable_varlen_attention(model)
    model.train()
    cases = ((trained, nullcontext(), True), (untrained, model.disable_adapter(), False))
    for conversations, adapter, stop in cases:
        with adapter:
            prompts = [gen.prompt_ids(tokenizer, m) for m in conversations]
            batched = ev.generate_batch(model, prompts, stops, max_new_tokens=24)
            for messages, (ids, stopped) in zip(conversations, batched, strict=True):
                assert ids == gen.generate_ids(model, tokenizer, messages, max_new_tokens=24)
                assert stopped == stop
    assert model.training and model.get_base_model().config._attn_implementation == ATTN_NAME


@contextmanager
def never_stops(model, tokenizer, cycle: list[int]):
    """A broken model: whatever it is asked, it writes ``cycle`` again and again and never ends the turn
    (the logits of the next token in the cycle after the last input token win, every other one loses)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    last = {}

    def remember_input(module, args):
        last["ids"] = args[0][:, -1]

    def force_cycle(module, args, logits):
        nxt = torch.tensor([cycle[(cycle.index(t) + 1) % len(cycle)] if t in cycle else cycle[0]
                            for t in last["ids"].tolist()])  # fmt: skip
        forced = torch.full_like(logits, -1e4)
        forced[torch.arange(len(nxt)), -1, nxt] = 0.0
        return forced

    hooks = [base.get_input_embeddings().register_forward_pre_hook(remember_input),
             base.get_output_embeddings().register_forward_hook(force_cycle)]  # fmt: skip
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def test_a_model_that_never_stops_has_stop_rate_0_and_loops(fixed_answer, tmp_path):
    cfg, _ = fixed_answer
    model, tokenizer, _ = gen.load_adapter(Path(cfg.output_dir) / "best")
    prompts, skipped = ev.validation_prompts(cfg.val_file, tokenizer, count=9, template="glm4", max_length=99)
    assert skipped == 0 and [p.reference for p in prompts] == [ANSWER] * 4
    stops = gen.stop_token_ids(tokenizer, model.get_base_model())
    runner = ev.GenerationEval(prompts, tokenizer, stops, max_new_tokens=40, batch_tokens=4096,
                               samples_path=tmp_path / "samples.jsonl")  # fmt: skip
    healthy = runner.run(model, step=1)
    assert healthy["stop_rate"] == 1.0 and healthy["repetition"] == 0.0 and healthy["exact_match"] == 1.0
    cycle = tokenizer(" sword fish and", add_special_tokens=False).input_ids  # 8 tokens: 5 copies in 40
    with never_stops(model, tokenizer, cycle):
        broken = runner.run(model, step=2)
    assert broken["stop_rate"] == 0.0 and broken["repetition"] == 1.0 and broken["exact_match"] == 0.0
    samples = _records(tmp_path, "samples.jsonl")
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert all(s["stopped"] and not s["loop"] for s in samples[:4])
    for s in samples[4:]:
        assert not s["stopped"] and s["loop"] and "sword fish and sword fish" in s["output"]


# ------------------------------------------------------------- the best evaluation and the over-fitting guard


def _run(evals: list[tuple[float, float, float]], *, metric: str, patience: int = 0):
    """Feed evaluations (train loss, val loss, value of ``metric`` unless that is val_loss) every 10 steps
    to judge; return the state and each evaluation's verdict."""
    state = {"best_val": None, "evals_since_best": 0}
    records, verdicts = [], []
    for i, (train_loss, val_loss, value) in enumerate(evals):
        step = 10 * (i + 1)
        records.append({"step": step, "loss": train_loss})
        record = {"step": step, "val_loss": val_loss, **_generated()}
        if metric != "val_loss":
            record[metric] = value
        records.append(record)
        verdicts.append(ev.judge(state, record, records, metric=metric, patience=patience))
    return state, verdicts


def _generated() -> dict:
    return {"exact_match": 0.5, "similarity": 0.5, "stop_rate": 1.0, "repetition": 0.0, "length_ratio": 1.0,
            "gen_seconds": 0.1}  # fmt: skip


def test_best_follows_the_metric_not_the_validation_loss():
    # the validation loss keeps falling; exact match peaks at step 20 and ties there again at step 40
    evals = [(2.0, 1.5, 0.25), (1.5, 1.2, 0.75), (1.0, 1.0, 0.5), (0.8, 0.9, 0.75), (0.6, 0.8, 0.5)]
    state, verdicts = _run(evals, metric="exact_match")
    assert [v.improved for v in verdicts] == [True, True, False, True, False]  # the tie: lower val loss
    scores = "similarity 0.500, stop rate 1.00, repetition 0.00, length ratio 1.00 (generated in 0.1 s)"
    assert verdicts[0].lines == [f"step 10: val loss 1.5000, exact match 0.250, {scores} (best)"]
    assert verdicts[2].lines == [f"step 30: val loss 1.0000, exact match 0.500, {scores}"]
    assert state["best_step"] == 40 and state["best_val"] == 0.9 and state["best_metric"] == 0.75
    state, verdicts = _run(evals, metric="val_loss")
    assert all(v.improved for v in verdicts) and state["best_step"] == 50
    # lower is better for repetition, closest to 1 for the length ratio
    state, _ = _run([(1, 1, 0.5), (1, 1, 0.0), (1, 1, 0.25)], metric="repetition")
    assert state["best_step"] == 20
    state, _ = _run([(1, 1, 2.0), (1, 1, 0.8), (1, 1, 1.3), (1, 1, 1.1)], metric="length_ratio")
    assert state["best_step"] == 40
    assert ev.format_eval({"step": 7, "val_loss": 2.0}, best=True) == "step 7: val loss 2.0000 (best)"


def test_the_guard_names_the_best_step_when_training_loss_falls_and_the_metric_worsens():
    evals = [(2.0, 1.5, 0.5), (1.5, 1.2, 1.0), (1.0, 1.0, 0.75), (0.8, 0.9, 0.5), (0.6, 0.8, 0.25),
             (0.5, 0.7, 0.0)]  # fmt: skip
    _, verdicts = _run(evals, metric="exact_match")  # patience 0: the guard speaks after 3, training goes on
    guard = [line for v in verdicts for line in v.lines if line.startswith("over-fitting")]
    assert len(guard) == 1 and "since step 20" in guard[0] and "3 evaluations in a row" in guard[0]
    assert "over-fitting" in verdicts[4].lines[-1] and not any(v.stop for v in verdicts)
    _, verdicts = _run(evals, metric="exact_match", patience=2)  # patience: the guard, then stop
    assert "over-fitting" in verdicts[3].lines[-1] and "since step 20" in verdicts[3].lines[-1]
    assert [v.stop for v in verdicts[:4]] == [False, False, False, True]
    # training loss rising too: not over-fitting, nothing said; patience still stops
    rising = [(1.0 + i, 1.0, value) for i, (_, _, value) in enumerate(evals)]
    _, verdicts = _run(rising, metric="exact_match", patience=2)
    assert not any("over-fitting" in line for v in verdicts for line in v.lines) and verdicts[3].stop
    # a plateau at the best value is not worse: no warning however long it lasts
    _, verdicts = _run([(2.0 - 0.1 * i, 1.0, 1.0) for i in range(6)], metric="exact_match")
    assert not any("over-fitting" in line for v in verdicts for line in v.lines)


def test_resumed_state_from_before_metric_for_best_keeps_its_best_validation_loss():
    state = {"best_val": 0.5, "evals_since_best": 1}  # a checkpoint written before best_metric existed
    verdict = ev.judge(state, {"step": 30, "val_loss": 0.6}, [], metric="val_loss", patience=2)
    assert not verdict.improved and verdict.stop and state["best_val"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--metric-for-best", "bleu", "--eval-generate", "2"], "'bleu' is not one of val_loss, exact_match"),
     (["--metric-for-best", "exact_match", "--eval-generate", "0"], "set eval_generate"),
     (["--eval-generate", "-1"], "eval_generate must not be negative"),
     (["--eval-max-new-tokens", "0"], "eval_max_new_tokens must be at least 1")],
)  # fmt: skip
def test_bad_generation_settings_are_one_line_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)
    assert load_config([]).eval_generate > 0  # on in the demo
    assert load_config(["--model", "some/model"]).eval_generate == 0  # off by default


def test_a_resumed_run_keeps_the_answers_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "eval_samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "prompt": p, "output": "x"}) + "\n" for s in (5, 10, 15)
                            for p in range(2)))  # fmt: skip
    ev._keep_samples_up_to(path, 10)  # resumed from checkpoint 10: evaluation 15 is redone
    kept = [(r["step"], r["prompt"]) for r in _records(tmp_path, path.name)]
    assert kept == [(5, 0), (5, 1), (10, 0), (10, 1)]
    ev._keep_samples_up_to(path, 0)  # a fresh run
    assert path.read_text() == ""


def test_generation_batches_fit_the_token_budget():
    prompts = [ev.Prompt(i, [1] * n, "") for i, n in enumerate([20, 50, 5, 40, 10, 30, 95])]
    runner = ev.GenerationEval(prompts, None, set(), max_new_tokens=10, batch_tokens=100)
    batches = runner.batches(runner.prompts)
    assert [[len(p.ids) for p in b] for b in batches] == [[95], [50], [40, 30], [20, 10, 5]]
    for b in batches:  # rows x (longest prompt + new tokens), or a single row however long
        assert len(b) == 1 or len(b) * (max(len(p.ids) for p in b) + 10) <= 100


def test_reasoning_answers_are_scored_on_their_final_answer():
    """The reference of reasoning data holds its reasoning; the model's own reasoning never matches it
    word for word, so exact_match compared whole turns was 0 whatever the answers."""
    reference = "<think>\nThe capital of France is Paris.\n</think>\n\nParis."
    output = "<think>\nFrance... its capital is Paris, I think.\n</think>\n\nParis."
    scores = ev.answer_scores(output, reference, True)
    assert scores["exact_match"] and scores["similarity"] == 1.0 and scores["length_ratio"] == 1.0
    assert not ev.answer_scores("<think>x</think>Rome.", reference, True)["exact_match"]
    assert ev.answer_scores("Paris.", "Paris.", True)["exact_match"]  # no reasoning: the whole turn
    assert ev.split_reasoning(reference) == (reference[: reference.index("\n\nParis.")], "\n\nParis.")
