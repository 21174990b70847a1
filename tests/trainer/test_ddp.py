"""torchrun with 2 CPU processes (gloo), data parallel and FSDP2, against one process over the same rows:
same losses, gradients (their norm, every step), validation losses, generated answers and adapter; rank 0
alone writes; resume works, also after kill -9 and across 2 "nodes" joined by torchrun's c10d rendezvous."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.distributed as distributed
from trainer.config import ConfigError, load_config
from trainer.data import DEMO_TRAIN_FILE, DEMO_VAL_FILE, encode_file
from trainer.distributed import close_world, init_world
from trainer.lock import OutputDirBusy, output_dir_lock
from trainer.model import apply_lora, enable_varlen_attention, lm_head_spec, load_model
from trainer.packing import make_packed_batches
from trainer.parallel import FullySharded
from trainer.train import (
    LiveHead,
    TrainingError,
    _sharded_save,
    data_parallel_step,
    forward_backward,
    parallel_step,
    resume,
    rng_state,
    run_eval,
    set_rng_state,
    setup,
    train,
)
from tritrain_kernels import masked_linear_cross_entropy

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data: Path, out: Path, grad_accum: int) -> list[str]:
    # 16 conversations pack into 5 rows: with 2 ranks x 1 row a step, the last step of each epoch has
    # one row, so rank 1 has none; 3 validation rows do not split evenly either
    return ["--device", "cpu", "--max-tokens", "256", "--max-length", "256", "--lr", "5e-3",
            "--lora-dropout", "0", "--max-steps", "0", "--epochs", "2", "--warmup", "2", "--log-every", "1",
            "--eval-every", "3", "--save-every", "3", "--train-file", str(data / "train.jsonl"),
            "--val-file", str(data / "val.jsonl"), "--grad-accum", str(grad_accum),
            "--eval-generate", "3", "--eval-max-new-tokens", "6", "--output-dir", str(out)]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", port, "-m", "trainer", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _node(endpoint: str, args: list[str], log: Path) -> subprocess.Popen:
    """One "node" of 2: torchrun with 1 process, joining the others through c10d on the loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "tritrain-test",
           "-m", "trainer", *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=1e-5, atol=0)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(DEMO_TRAIN_FILE.read_text().splitlines()[:16]) + "\n")
    (data / "val.jsonl").write_text("\n".join(DEMO_VAL_FILE.read_text().splitlines()[:6]) + "\n")
    # one process with 2 rows a step sees the same rows per step as 2 processes with 1 row each
    merged = ["--save-merged", "true"]  # under torchrun: merged after the process group is closed
    single = train(load_config([*_args(data, tmp / "single", grad_accum=2), *merged]))
    ddp = _torchrun([*_args(data, tmp / "ddp", grad_accum=1), *merged])
    fsdp = _torchrun([*_args(data, tmp / "fsdp", grad_accum=1), "--parallel", "fsdp"])
    return tmp, data, single, ddp, fsdp


def _same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:  # AdamW turns 1e-7 gradient noise on near-zero entries into ~1% of lr
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-4, msg=f"{b_dir} {key}")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, parallel):
    tmp, _, single, ddp, fsdp = runs
    done = {"ddp": ddp, "fsdp": fsdp}[parallel]
    one, two = _metrics(tmp / "single"), _metrics(tmp / parallel)
    assert f"5 packed rows per epoch, 6 steps of 1 rows on each of 2 processes ({parallel})" in done.stdout
    assert single["steps"] == 6 and len(single["losses"]) == 6
    assert [sorted(r) for r in one] == [sorted(r) for r in two]  # same records, each written once
    for key in ("loss", "grad_norm", "val_loss"):  # grad_norm: of the summed gradients, before clipping
        _close([r[key] for r in two if key in r], [r[key] for r in one if key in r])
    # generation is split across the processes (3 prompts on 2 ranks) and gathered: the same answers
    answers = [(tmp / run / "eval_samples.jsonl").read_text().splitlines() for run in ("single", "ddp")]
    assert answers[0] == answers[1] and len(answers[0]) == 3 * len([r for r in one if "val_loss" in r])
    for key in ("exact_match", "similarity", "stop_rate", "repetition", "length_ratio"):
        assert [r[key] for r in two if key in r] == [r[key] for r in one if key in r]
    assert [r["lr"] for r in two if "lr" in r] == [r["lr"] for r in one if "lr" in r]
    for name in ("final", "best"):  # standard PEFT adapters, also under FSDP
        _same_adapter(tmp / "single" / name, tmp / parallel / name)
        _same_adapter(tmp / "ddp" / name, tmp / parallel / name)
    for name in ("checkpoint-000003", "checkpoint-000006"):
        files = {p.name for p in (tmp / parallel / name).iterdir()}
        assert {"rng-rank0.pt", "rng-rank1.pt", "state.json", "scheduler.pt"} <= files, files
        if parallel == "ddp":  # one adapter; FSDP: each rank's shard through torch.distributed.checkpoint
            _same_adapter(tmp / "single" / name, tmp / "ddp" / name)
        else:
            assert sorted(p.name for p in (tmp / "fsdp" / name / "sharded").glob("*.distcp")) == [
                "__0_0.distcp", "__1_0.distcp"]  # fmt: skip


def test_only_rank_0_writes(runs):
    tmp, _, _, ddp, _ = runs
    names = {run: sorted(p.name for p in (tmp / run).iterdir()) for run in ("single", "ddp", "fsdp")}
    assert names["ddp"] == names["single"] == sorted(names["fsdp"] + ["merged"])
    a = load_file(tmp / "single" / "merged" / "model.safetensors")
    b = load_file(tmp / "ddp" / "merged" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
    lines = ddp.stdout.splitlines()
    assert sum(line.startswith("step 1/6: loss") for line in lines) == 1, ddp.stdout
    assert sum(line.startswith("model ") for line in lines) == 1, ddp.stdout


@pytest.mark.slow  # one more torchrun launch (~20 s on 2 CPU cores)
def test_resume_with_two_processes(runs):
    tmp, data, _, _, _ = runs
    out = tmp / "resumed"
    shutil.copytree(tmp / "ddp", out)
    for name in ("checkpoint-000006", "final"):
        shutil.rmtree(out / name)
    _torchrun([*_args(data, out, grad_accum=1), "--resume", "auto"])
    full, resumed = _metrics(tmp / "ddp"), _metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    _close([r["loss"] for r in resumed if "loss" in r], [r["loss"] for r in full if "loss" in r])
    with pytest.raises(TrainingError, match="made with 2 processes, this run has 1"):
        train(load_config([*_args(data, out, grad_accum=1), "--resume", "auto"]))


# ------------------------------------------------------------------------------------ one step's gradients


def _model_and_rows():
    """The demo with LoRA (B nonzero, so every LoRA weight gets a gradient) and 5 packed rows."""
    cfg = load_config(["--device", "cpu", "--lora-dropout", "0"])
    model, tokenizer = load_model(cfg)
    head = lm_head_spec(model)
    enable_varlen_attention(model, "reference")
    torch.manual_seed(0)  # LoRA A's init: the same in every process, as train() seeds it
    model = apply_lora(model, cfg)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    data, _ = encode_file(DEMO_TRAIN_FILE, tokenizer, max_length=256, progress=False)
    return model, head, make_packed_batches(data[:7], 256)


def _grads(model) -> dict:
    """Each LoRA gradient, whole (an FSDP gradient is a DTensor shard)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.clone()
    model.zero_grad(set_to_none=True)
    return grads


PARALLEL = ("ddp", "fsdp", "fsdp cpu offload")


def _step_worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    world = init_world("cpu")
    try:
        results = {parallel: {} for parallel in PARALLEL}
        for parallel in PARALLEL:
            model, head, rows = _model_and_rows()
            if parallel != "ddp":
                strategy = FullySharded(world, cpu_offload=parallel == "fsdp cpu offload")
                model = strategy.wrap(model)
                head = LiveHead(model.get_base_model().get_output_embeddings(), None, strategy)
            for case, group in (("5 rows", rows), ("1 row", rows[:1])):  # 1 row: rank 1 has none
                if parallel == "ddp":
                    loss, stop = data_parallel_step(model, group, head, masked_linear_cross_entropy, CPU,
                                                    nullcontext(), world, interrupt=rank == 1)  # fmt: skip
                else:
                    loss, stop = parallel_step(model, group, head, masked_linear_cross_entropy, CPU,
                                               nullcontext(), strategy, interrupt=rank == 1)  # fmt: skip
                    # the norm all-reduces the (offloaded: CPU) gradient shards; inf: nothing clipped
                    params = [p for p in model.parameters() if p.requires_grad]
                    results[parallel][case + " norm"] = strategy.grad_norm(params, math.inf).clone()
                results[parallel][case] = (loss.clone(), stop, _grads(model))
        # each rank saves its own random state into one checkpoint and gets it back
        torch.manual_seed(100 + rank)
        write = lambda tmp: torch.save(rng_state(CPU), tmp / f"rng-rank{rank}.pt")  # noqa: E731
        _sharded_save(world, out / "checkpoint", write)
        drawn = torch.rand(4)
        set_rng_state(torch.load(out / "checkpoint" / f"rng-rank{rank}.pt", weights_only=False), CPU)
        results["rng"] = (drawn, torch.rand(4))
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        close_world(world)


def test_step_gradients_of_two_processes_equal_one(tmp_path):
    torch.multiprocessing.spawn(_step_worker, args=(_free_port(), tmp_path), nprocs=2, join=True)
    model, head, rows = _model_and_rows()
    assert len(rows) == 5
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    (drawn0, again0), (drawn1, again1) = ranks[0]["rng"], ranks[1]["rng"]
    assert torch.equal(drawn0, again0) and torch.equal(drawn1, again1)  # each rank's stream continues
    assert not torch.equal(drawn0, drawn1)  # and it is its own, not rank 0's
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["rng-rank0.pt", "rng-rank1.pt"]
    for parallel in PARALLEL:
        _compare_step(model, head, rows, [results[parallel] for results in ranks], parallel)


def _compare_step(model, head, rows, ranks: list[dict], parallel: str) -> None:
    """Each rank's loss and gradients after one step of ``parallel`` against one process's."""
    for case, group in (("5 rows", rows), ("1 row", rows[:1])):
        loss = forward_backward(model, group, head, masked_linear_cross_entropy, CPU, nullcontext())
        reference = _grads(model)
        norm = torch.cat([g.reshape(-1) for g in reference.values()]).double().norm()
        for rank, results in enumerate(ranks):
            if case + " norm" in results:
                msg = f"{parallel} {case} rank {rank} grad norm"
                torch.testing.assert_close(results[case + " norm"].double(), norm, rtol=1e-5, atol=0, msg=msg)
            got_loss, stop, grads = results[case]
            assert stop  # rank 1 asked: every rank stops
            torch.testing.assert_close(
                got_loss, loss, rtol=1e-5, atol=0, msg=f"{parallel} {case} rank {rank}"
            )
            assert grads.keys() == reference.keys()
            for name, grad in reference.items():
                assert grad.abs().max() > 0, name
                # fp32 sums in another order: entries near zero get an error relative to the largest
                atol = 1e-6 * grad.abs().max().item()
                msg = f"{parallel} {case} {name}"
                torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=atol, msg=msg)
        for name in reference:  # the all-reduce leaves the same numbers on every rank
            assert torch.equal(ranks[0][case][2][name], ranks[1][case][2][name])


@pytest.mark.slow  # two more launches, the second as 2 nodes (~60 s on 2 busy CPU cores)
def test_fsdp_resumes_after_kill_9_on_two_nodes(runs):
    """kill -9 of an FSDP run mid-way, then --resume auto with its 2 processes started as 2 "nodes"
    (torchrun's c10d rendezvous on the loopback): the logged losses are those of the uninterrupted run."""
    tmp, data, _, _, _ = runs
    out = tmp / "killed"
    args = [*_args(data, out, grad_accum=1), "--parallel", "fsdp", "--save-every", "1"]
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", port, "-m", "trainer", *args]  # fmt: skip
    killed = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 90
    while not (out / "checkpoint-000001").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)  # torchrun and both trainers, no chance to clean up
    killed.wait()
    assert (out / "checkpoint-000001").exists() and not (out / "final").exists()

    endpoint = f"127.0.0.1:{_free_port()}"
    logs = [tmp / f"node{i}.log" for i in range(2)]
    nodes = [_node(endpoint, [*args, "--resume", "auto"], log) for log in logs]
    codes = [node.wait(timeout=120) for node in nodes]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert "resumed from" in "".join(log.read_text() for log in logs)
    full, resumed = _metrics(tmp / "fsdp"), _metrics(out)
    assert [sorted(r) for r in resumed] == [sorted(r) for r in full]
    for key in ("loss", "grad_norm", "val_loss"):
        _close([r[key] for r in resumed if key in r], [r[key] for r in full if key in r])
    _same_adapter(tmp / "fsdp" / "final", out / "final")


# ---------------------------------------------------------------------- the process group and agreement


def test_the_process_group_has_gloo_beside_nccl_on_cuda(monkeypatch):
    """With FSDP's CPU offload the gradients are CPU DTensors: the grad norm's all-reduce needs a CPU
    backend in the process group, so CUDA runs get nccl for GPU tensors and gloo for CPU ones (issue 25
    item 2)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: asked.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_world("auto").rank == 1 and init_world("cuda").size == 2
    init_world("cpu")
    assert [kwargs["backend"] for kwargs in asked] == ["cuda:nccl,cpu:gloo", "cuda:nccl,cpu:gloo", "gloo"]
    assert distributed.process_group_backend(use_cuda=False) == "gloo"


def _spawn_within(worker, args: tuple, *, ready: list[Path], seconds: float) -> None:
    """Start 2 processes of ``worker``; once every path of ``ready`` exists (start-up: imports, model),
    they must all end within ``seconds``, else they are killed and the test fails (a hang)."""
    context = torch.multiprocessing.spawn(worker, args=args, nprocs=2, join=False)
    try:
        start_up = time.monotonic() + 300
        while not all(p.exists() for p in ready):
            alive = all(p.is_alive() for p in context.processes)
            assert alive and time.monotonic() < start_up, "a process ended or hung before it was ready"
            time.sleep(0.05)
        deadline = time.monotonic() + seconds
        while not context.join(timeout=0.5):
            assert time.monotonic() < deadline, f"the processes did not end within {seconds} s: a hang"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _as_rank(rank: int, port: int) -> None:
    """This process as rank ``rank`` of 2, as torchrun would describe it."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)


def _join(rank: int, port: int) -> distributed.World:
    _as_rank(rank, port)
    return init_world("cpu")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not picklable")


def _agreement_worker(rank: int, port: int, out: Path) -> None:
    world = _join(rank, port)
    (out / f"ready{rank}").touch()
    seen = []
    try:
        for failing, error in ((None, None), (1, ConfigError("resume: one line")), (0, Unpicklable("a\nb"))):
            try:
                with world.all_or_none():
                    if rank == failing:
                        raise error
                seen.append(None)
            except Exception as e:
                seen.append((type(e).__name__, str(e)))
        seen.append(world.all_true(torch.tensor(rank == 0)))
        seen.append(world.all_true(torch.tensor(True)))
        seen.append(world.from_main(f"rank {rank}"))
        (out / f"seen{rank}.json").write_text(json.dumps(seen))
    finally:
        close_world(world)


def test_a_rank_local_failure_stops_every_rank_with_its_line(tmp_path):
    """World.all_or_none: the failing rank raises its own error, the others the same class and message;
    an error that does not pickle travels as a RuntimeError with its one line (issue 25 item 7)."""
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    _spawn_within(_agreement_worker, (_free_port(), tmp_path), ready=ready, seconds=60)
    seen = [json.loads((tmp_path / f"seen{rank}.json").read_text()) for rank in (0, 1)]
    line = ["ConfigError", "resume: one line"]
    assert seen[0] == [None, line, ["Unpicklable", "a\nb"], False, True, "rank 0"]
    assert seen[1] == [None, line, ["RuntimeError", "Unpicklable: a b"], False, True, "rank 0"]


def _small_data(data: Path) -> Path:
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text("\n".join(DEMO_TRAIN_FILE.read_text().splitlines()[:16]) + "\n")
    (data / "val.jsonl").write_text("\n".join(DEMO_VAL_FILE.read_text().splitlines()[:6]) + "\n")
    return data


def _busy_worker(rank: int, port: int, data: Path, out: Path) -> None:
    _as_rank(rank, port)  # train() joins the group
    (out.parent / f"ready{rank}").touch()
    try:
        train(load_config([*_args(data, out, grad_accum=1), "--max-steps", "1"]))
        result = "trained"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    (out.parent / f"result{rank}.txt").write_text(result)


def test_a_busy_output_dir_stops_every_rank(tmp_path):
    """Rank 0 alone takes the output_dir lock: when it is busy, every rank stops with rank 0's line at
    once, instead of rank 1 loading the model and waiting in the first collective (issue 25 item 7)."""
    data, out = _small_data(tmp_path / "data"), tmp_path / "out"
    with output_dir_lock(out):
        ready = [tmp_path / "ready0", tmp_path / "ready1"]
        _spawn_within(_busy_worker, (_free_port(), data, out), ready=ready, seconds=60)
    results = [(tmp_path / f"result{rank}.txt").read_text() for rank in (0, 1)]
    assert results[0] == results[1], results
    assert results[0].startswith(f"{OutputDirBusy.__name__}: output_dir {out} is in use by process ")


@pytest.mark.slow  # a one-process run, then 2 torchrun "nodes" (~40 s on 2 busy CPU cores)
def test_a_rank_missing_its_random_state_stops_both_ranks_with_one_line(tmp_path):
    """Resume where rank 1's rng-rank1.pt is missing: rank 1 cannot load, and rank 0 must not go on into
    the collectives; both end at once with the one-line error (exit status 2) (issue 25 item 7)."""
    data, out = _small_data(tmp_path / "data"), tmp_path / "out"
    args = [*_args(data, out, grad_accum=1), "--max-steps", "2", "--save-every", "1", "--eval-every", "0"]
    train(load_config(args))  # the checkpoints of one process: the newest made as if by 2
    checkpoint = out / "checkpoint-000002"
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    assert (checkpoint / "rng-rank0.pt").is_file() and not (checkpoint / "rng-rank1.pt").exists()
    endpoint = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [_node(endpoint, [*args, "--resume", "auto"], log) for log in logs]
    try:
        codes = [node.wait(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    texts = [log.read_text() for log in logs]
    line = f"error: resume: {checkpoint} has no rng-rank1.pt (made by an older version of the trainer"
    for text in texts:  # each node: its process printed the line and ended with status 2
        assert line in text and "exitcode  : 2" in text and codes != [0, 0], text[-3000:]


def _eval_worker(rank: int, port: int, data: Path, out: Path) -> None:
    world = _join(rank, port)
    try:
        args = [*_args(data, out, grad_accum=1), "--parallel", "fsdp", "--eval-generate", "2",
                "--eval-max-new-tokens", "6", "--metric-for-best", "stop_rate"]  # fmt: skip
        run = setup(load_config(args), world)
        resume(run)
        # a rank-local difference in the answers: rank 0's end at their first token, rank 1's never
        vocab = run.model.get_base_model().get_output_embeddings().out_features
        run.generation.stops = set(range(vocab)) if rank == 0 else set()
        run.state.update(best_val=9.0, best_metric=0.5, best_by="stop_rate")  # the best so far: 0.5
        (out / f"ready{rank}").touch()
        stop = run_eval(run)
        (out / f"eval{rank}.json").write_text(json.dumps({"state": run.state, "stop": stop}))
        (out / f"record{rank}.json").write_text(json.dumps(run.records[-1]))
    finally:
        close_world(world)


def test_fsdp_generation_eval_ends_together_and_agrees_on_best(tmp_path):
    """FSDP: every rank answers every prompt, and each forward pass gathers the weights from all ranks.
    A rank whose answers end sooner keeps decoding until every rank is done, and every rank takes rank
    0's numbers, so the best/ verdict (a collective save) is one (issue 25 item 4). Before: rank 0 left
    its decode loop first and the ranks hung in mismatched gathers."""
    data, out = _small_data(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    ready = [out / "ready0", out / "ready1"]
    _spawn_within(_eval_worker, (_free_port(), data, out), ready=ready, seconds=60)
    verdicts = [json.loads((out / f"eval{rank}.json").read_text()) for rank in (0, 1)]
    records = [json.loads((out / f"record{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1] and records[0]["stop_rate"] == 1.0  # rank 0's answers
    assert verdicts[0] == verdicts[1] and verdicts[0]["state"]["best_metric"] == 1.0
    assert (out / "best" / "adapter_model.safetensors").is_file()
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["stopped"] for s in samples] == [True, True] and [s["output"] for s in samples] == ["", ""]
