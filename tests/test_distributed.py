"""Training on several processes (torchrun): the same run, the same numbers, one writer."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from tessera.errors import ConfigError
from tessera.train.distributed import SINGLE, Processes, join, leave
from tessera.train.run import RunConfig, run_training
from tests.test_resume import _config, shapes  # noqa: F401 (a fixture)
from tests.test_train import with_text_only_questions

ROOT = Path(__file__).resolve().parents[1]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _torchrun(config: dict, directory: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    (directory / "run.yaml").write_text(yaml.safe_dump(config))
    # `tessera train` as torchrun runs it; the module path instead of the console script, which a checkout run with
    # PYTHONPATH may not have
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tessera.cli", "train", str(directory / "run.yaml"), "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("recipe, fields, text_only", [
    ("llava", {"grad_accum": 2, "group_by_length": True, "checkpoint_every": 3}, 0),  # step checkpoints mid-stage
    # Method B, the LLM frozen: half the questions have no image, so some processes' shares reach no trainable
    # weight (no gradient there; the other process's count)
    ("llama3.2", {"steps": {"text": 2, "pretrain": 3, "finetune": 6}}, 40),
])
def test_a_run_on_two_processes_computes_what_it_computes_on_one(shapes, tmp_path, recipe, fields,  # noqa: F811
                                                                 text_only):
    """Each process takes half of every batch and the gradients are summed over both: the losses, gradient norms
    and weights are the one-process run's, up to the order of float additions. Only the first process writes:
    each step is recorded once, each checkpoint saved once."""
    data = with_text_only_questions(shapes, tmp_path / "data", text_only) if text_only else shapes
    config = {**_config(shapes, tmp_path / "one", recipe=recipe, **fields), "data": str(data)}
    alone = run_training(RunConfig.from_dict(config), log=lambda *_: None, progress=False)
    done = _torchrun({**config, "out": str(tmp_path / "two")}, tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("trained ")]
    assert len(summaries) == 1  # from the first process only

    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [(r["stage"], r["step"], r["tokens"]) for r in two] == [(r["stage"], r["step"], r["tokens"]) for r in one]
    assert len(two) == alone["steps"] > 0
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                 rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one/checkpoints").iterdir())
    ours = load_file(tmp_path / "two/checkpoint/model.safetensors")
    theirs = load_file(tmp_path / "one/checkpoint/model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("resumed_on", [1, 2])
def test_a_run_stopped_on_two_processes_resumes_on_any_number(shapes, tmp_path, resumed_on):  # noqa: F811
    """The first process saves OUT/interrupted when torchrun's workers are stopped; the run is a run, however many
    processes train it, so one process, or two again, continue it to the numbers of the run never stopped."""
    config = _config(shapes, tmp_path / "straight")
    run_training(RunConfig.from_dict(config), log=lambda *_: None, progress=False)
    stopped = {**config, "out": str(tmp_path / "stopped")}
    # an error in run step 6 of both processes (gradients summed, nothing applied) stops the run as Ctrl-C would
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\nclip, calls = torch.nn.utils.clip_grad_norm_, []\n"
        "def clip_and_stop(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 6:\n"
        "        raise KeyboardInterrupt\n"
        "    return clip(*args, **kwargs)\n"
        "torch.nn.utils.clip_grad_norm_ = clip_and_stop\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(stopped))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "tessera.cli", "train", str(tmp_path / "run.yaml"), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert done.returncode != 0 and (tmp_path / "stopped/interrupted").is_dir(), done.stderr[-3000:]
    assert len(_records(tmp_path / "stopped")) == 5
    if resumed_on == 1:
        assert run_training(RunConfig.from_dict(stopped), log=lambda *_: None, progress=False,
                            resume=True)["resumed_at"] == 5
    else:
        done = _torchrun(stopped, tmp_path, 2, "--resume")
        assert done.returncode == 0 and "resumed at run step 5" in done.stdout, done.stderr[-3000:]
    assert not (tmp_path / "stopped/interrupted").exists()  # the finished run removed its stop
    ours, theirs = _records(tmp_path / "stopped"), _records(tmp_path / "straight")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-5)
    resumed = load_file(tmp_path / "stopped/checkpoint/model.safetensors")
    for name, tensor in load_file(tmp_path / "straight/checkpoint/model.safetensors").items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-4, msg=name)


def _sum_gradients_in(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    both, first_only, neither = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), float(rank + 1))
    if rank == 0:
        first_only.grad = torch.tensor([1.0, 2.0, 3.0])
    Processes(rank, 2).sum_gradients([both, first_only, neither])
    torch.save({"both": both.grad, "first_only": first_only.grad, "neither": neither.grad}, f"{results}.{rank}")
    dist.destroy_process_group()


def test_a_gradient_only_some_processes_have_is_summed_and_none_anywhere_stays_none(tmp_path):
    """A process whose rows hold no image leaves the vision encoder without gradients while another has them: they
    are summed as if it had zeros (no process waits for a message that never comes). A parameter no process gave a
    gradient keeps none, as in one process, where AdamW then leaves it alone."""
    mp.spawn(_sum_gradients_in, args=(str(tmp_path / "store"), str(tmp_path / "grads")), nprocs=2)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads.{rank}")
        assert torch.equal(grads["both"], torch.full((3,), 3.0))
        assert torch.equal(grads["first_only"], torch.tensor([1.0, 2.0, 3.0]))
        assert grads["neither"] is None


def _train_a_step_and_leave_in(rank: int, port: int, results: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    processes = join()
    model = torch.nn.Linear(3, 3)
    model(torch.ones(2, 3)).sum().backward()
    processes.sum_gradients(list(model.parameters()))
    torch.optim.AdamW(model.parameters(), fused=True).step()  # built, an optimizer imports torch's compiler
    leave(processes)
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else None
    torch.save(names, f"{results}.{rank}")


def test_leaving_after_a_training_step_ends_the_process_groups_threads(tmp_path):
    """They outlived the group when the optimizer, built, imported torch's compiler (which kept the group), and
    one still releasing a collective's tensors at interpreter exit aborted the process: 1 torchrun run in 10 on a
    busy machine failed with SIGABRT after training had finished."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_a_step_and_leave_in, args=(port, str(tmp_path / "threads")), nprocs=2)
    for rank in (0, 1):
        names = torch.load(tmp_path / f"threads.{rank}")
        if names is None:
            pytest.skip("no /proc/self/task to list a process's threads")
        assert not [n for n in names if "gloo" in n], names


def test_a_batch_that_does_not_split_evenly_is_refused_naming_batch_size():
    SINGLE.check_batch_size(5)
    Processes(1, 2).check_batch_size(4)
    with pytest.raises(ConfigError, match=r"batch_size=6 with 4 processes: expected a multiple"):
        Processes(0, 4).check_batch_size(6)
    assert Processes(1, 2).share([0, 1, 2, 3, 4, 5]) == [1, 3, 5]
    with pytest.raises(ConfigError, match="leaves process 2 of 3 none"):
        Processes(2, 3).share([0, 1])  # a stage whose data is smaller than the process count


def test_other_verbs_started_by_torchrun_are_refused_before_doing_anything(tmp_path, monkeypatch, capsys):
    """Under torchrun every process would make the quickstart's data, answer eval's records, bind serve's port:
    only train shares the work out, so the others say so instead of racing each other into the same files."""
    from tessera.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["data", "shapes", "--out", str(tmp_path / "data"), "--train", "2", "--test", "1"]) == 2
    assert "started by torchrun (WORLD_SIZE=2), which only `tessera train` shares out" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_processes_that_kept_different_records_stop_before_training_naming_them(shapes, tmp_path):  # noqa: F811
    """A process that cannot read an image the others read (a node without it) skips that record and would train
    on other batches than the main process: the run would silently compute what no single process does."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nimport PIL.Image\nopen_image = PIL.Image.open\n"
        "def without_one(path, *args, **kwargs):\n"
        "    if os.environ.get('RANK') == '1' and str(path).endswith('train_00003.png'):\n"
        "        raise FileNotFoundError(path)\n"
        "    return open_image(path, *args, **kwargs)\n"
        "PIL.Image.open = without_one\n")
    config = _config(shapes, tmp_path / "run")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "tessera.cli", "train", str(tmp_path / "run.yaml"), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert done.returncode != 0
    said = f"{shapes / 'train.json'}: process 1 kept 78 records (2 unreadable image) where process 0 kept 80; " \
           f"expected every process to read the same data"
    # every process stops, each saying so on a line of its own (they once ran into one line); the first as any run
    lines = sorted(line for line in done.stderr.splitlines() if line.startswith("tessera train"))
    assert sorted(line.split(": error: ")[0] for line in lines) == ["tessera train", "tessera train (process 1 of 2)"]
    assert all(said in line for line in lines), done.stderr[-3000:]
    assert not (tmp_path / "run/metrics.jsonl").exists()  # nothing trained


def test_a_stage_with_fewer_records_than_processes_is_refused_before_the_first_step():
    from types import SimpleNamespace

    from tessera.data.records import SkipReport
    from tessera.errors import DataError
    from tessera.train.recipes import Stage
    from tessera.train.run import check_stage_data

    captions = [SimpleNamespace(example=SimpleNamespace(type="caption"))]
    questions = [SimpleNamespace(example=SimpleNamespace(type="questions"))] * 4
    stages = [Stage("align", ("projector",), "captions", steps=2), Stage("instruct", ("llm",), "questions", steps=2)]
    report = SkipReport("train.json", kept=5)
    check_stage_data(stages, captions + questions, report, [], None, processes=1)
    with pytest.raises(DataError, match=re.escape("stage 'align' trains on caption records (\"type\": \"caption\"), "
                                                  "of which train.json has 1: fewer than the 2 processes")):
        check_stage_data(stages, captions + questions, report, [], None, processes=2)


def _one_process_leaves(rank: int, store: str, results: str) -> None:
    from tessera.errors import ProcessGroupError

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 1:
        os._exit(3)  # as a process killed, or stopped by its own error, leaves: no goodbye
    try:
        Processes(0, 2).sum(1.0)
    except ProcessGroupError as e:
        Path(results).write_text(str(e))
    finally:  # as leave() does: a group left to the interpreter's exit can abort it (see join())
        dist.destroy_process_group()


def test_a_process_left_waiting_for_one_that_stopped_says_so_in_one_line(tmp_path):
    """gloo raised a RuntimeError with a traceback and a paragraph of advice on the process whose peer stopped,
    burying the peer's own message; it is one line now, a tessera error, which the CLI prints as such."""
    context = mp.get_context("spawn")  # (mp.spawn would stop process 0 as soon as process 1 exits)
    processes = [context.Process(target=_one_process_leaves, args=(rank, str(tmp_path / "store"),
                                                                   str(tmp_path / "said"))) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 3]
    said = (tmp_path / "said").read_text()
    assert said.startswith("another process of this run stopped (")
    assert said.endswith("; its own message says why, or, if it was killed, torchrun's summary of the failed processes")
    assert "\n" not in said and "GLHF" not in said


def test_the_lock_of_a_torchrun_session_names_the_launcher_the_user_started(tmp_path, monkeypatch):
    """A second session into a torchrun run's OUT named rank 0's worker, a PID the user never saw; the one to wait
    for or stop is torchrun's (the workers' parent)."""
    from tessera.train.run import LOCK_FILE, training_lock

    monkeypatch.setenv("WORLD_SIZE", "2")
    with training_lock(tmp_path, print):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getppid()}\n"
    monkeypatch.delenv("WORLD_SIZE")
    with training_lock(tmp_path, print):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_only_a_peer_gone_is_said_as_such_and_a_group_the_caller_made_stays_theirs(tmp_path, monkeypatch):
    from tessera.errors import ProcessGroupError
    from tessera.train.distributed import _talking, join, leave

    with pytest.raises(ProcessGroupError, match=r"another process of this run stopped \(Connection closed by peer"):
        with _talking():
            raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:60123")
    for own in ("Tensors must be contiguous", "Timed out waiting 7200000ms for recv operation to complete"):
        with pytest.raises(RuntimeError, match=own):  # this process's own error, or a timeout: as it is
            with _talking():
                raise RuntimeError(own)
    # a script under torchrun that made its process group, then trains: run_training must not end the group
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        processes = join()
        assert not processes.joined
        leave(processes)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_more_threads_than_cores_across_a_machine_s_processes_is_warned_of(shapes, tmp_path, monkeypatch):  # noqa: F811
    """threads: is per process: a one-process config's threads: 2 run on two processes of a 2-core machine gives
    4 threads, each waiting at every barrier for a core another holds."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    logged, threads = [], torch.get_num_threads()
    steps = {"text": 1, "encoder_pretrain": 0, "align": 0, "instruct": 0}
    try:
        run_training(RunConfig.from_dict(_config(shapes, tmp_path / "a", threads=2, steps=steps)),
                     log=logged.append, progress=False)
        assert "warning: 2 processes × 2 threads on 2 cores; threads: is per process, expected processes × threads " \
               "≤ cores" in logged
        logged.clear()
        run_training(RunConfig.from_dict(_config(shapes, tmp_path / "b", threads=1, steps=steps)),
                     log=logged.append, progress=False)
        assert not [line for line in logged if line.startswith("warning: ")]
    finally:
        torch.set_num_threads(threads)  # run_training sets this process's, which the next tests run with
