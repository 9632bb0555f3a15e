"""What the user sees when the job fails: one readable line per failing rank, no tracebacks."""
import os
import subprocess
import sys

import pytest
from conftest import kill_job, run_job, start_job

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _faulty_run(tiny, tmp_path, port: str, **env) -> str:
    """fault_main.py (rank 1 fails at its third micro-step) under DeepSpeed's launcher; its output."""
    data = tmp_path / "task.jsonl"
    from chatts_train.standins.synthetic import write_series_task

    write_series_task(str(data), 24, length=120, seed=0)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port,
           os.path.join(ROOT, "tests", "fault_main.py"), "--model_path", tiny["0801"], "--data", str(data),
           "--output_dir", str(tmp_path / "run"), "--ds_config", os.path.join(ROOT, "ds_config.json"),
           "--fp16", "false", "--offload", "none", "--max_steps", "2", "--plot", "false", "--tensorboard", "false"]
    r = run_job(cmd, timeout=240, env=_cpu_env(**env), cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    return out


@pytest.mark.slow
def test_an_oom_on_rank_1_only_reaches_the_user_with_its_rank(tiny, tmp_path):
    out = _faulty_run(tiny, tmp_path, "29541")
    assert out.count("error (rank 1 of 2): CUDA out of memory at sequence length") == 1, out[-4000:]
    # names the sample, the plan it ran and what to run instead
    assert "task.jsonl:" in out and "under the plan '" in out and ("next plan down" in out or "no smaller plan" in out)
    assert "Traceback" not in out, out[-4000:]


@pytest.mark.slow
def test_a_rank_killed_outright_is_named_by_its_peer(tiny, tmp_path):
    """SIGKILL (the kernel's OOM killer) leaves no error of the rank's own: the other rank names it."""
    out = _faulty_run(tiny, tmp_path, "29549", FAULT="kill")
    assert "error (rank 0): stopped because rank 1 (pid " in out and "was killed without an error of its own" in out, \
        out[-4000:]
    assert "--resume" in out and "Traceback" not in out, out[-4000:]


def test_a_missing_deepspeed_config_is_one_line_before_any_process_group(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "chatts_train", "--model_path", tiny["0801"], "--ds_config",
                        str(tmp_path / "nowhere.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert f"error: --ds_config {tmp_path / 'nowhere.json'}: no such file" in r.stderr
    assert "Traceback" not in r.stderr


def _cpu_env(**extra):
    return {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def test_launch_sh_asks_for_no_more_gpus_than_cuda_visible_devices_names(tiny):
    """One node: launch.sh gives DeepSpeed's launcher CUDA_VISIBLE_DEVICES' first NUM_GPUS, and says what to set
    where that names fewer, before any process starts."""
    env = _cpu_env(MODEL_PATH=tiny["0801"], NUM_GPUS="2", CUDA_VISIBLE_DEVICES="3")
    out = subprocess.run(["bash", os.path.join(ROOT, "launch.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "CUDA_VISIBLE_DEVICES=3 names 1: set NUM_GPUS=1" in out.stderr, out.stderr[-2000:]
    assert "deepspeed.launcher" not in out.stdout + out.stderr


@pytest.mark.slow
def test_sigterm_to_launch_sh_stops_every_rank_cleanly_and_exits_after_them(tiny, tmp_path):
    """What `kill <pid>` of `bash launch.sh` (or a process supervisor) does: a resume checkpoint, then the
    script exits, with no rank left running."""
    import signal
    import time

    from chatts_train.standins.synthetic import write_series_task

    write_series_task(str(tmp_path / "task.jsonl"), 48, length=120, seed=0)
    run = tmp_path / "run"
    env = _cpu_env(MODEL_PATH=tiny["0801"], DATA=str(tmp_path / "task.jsonl"), OUTPUT=str(run), MASTER_PORT="29545")
    job = start_job(["bash", os.path.join(ROOT, "launch.sh"), "--fp16", "false", "--offload", "none",
                     "--max_steps", "200", "--save_steps", "0", "--plot", "false", "--tensorboard", "false"],
                    env=env, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:] if job.poll() else "slow"
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)  # to the script's pid only, not its group
        out, _ = job.communicate(timeout=120)
        with pytest.raises(ProcessLookupError):  # nothing of the job outlives the script
            os.killpg(job.pid, 0)
    finally:
        kill_job(job)  # what of the job outlived the script, where the check above failed
    assert "[stop] signal received: saved a resume checkpoint at step" in out, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "engine").is_dir() and "Traceback" not in out


@pytest.mark.slow
def test_without_a_launcher_one_process_trains_and_a_rerun_does_not_overwrite_it(tiny, tmp_path):
    from chatts_train.standins.synthetic import write_series_task

    write_series_task(str(tmp_path / "task.jsonl"), 24, length=120, seed=0)
    args = [sys.executable, "-m", "chatts_train", "--model_path", tiny["0801"], "--data", str(tmp_path / "task.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--ds_config", os.path.join(ROOT, "ds_config.json"), "--fp16",
            "false", "--offload", "none", "--max_steps", "1", "--plot", "false", "--tensorboard", "false"]
    env = {k: v for k, v in _cpu_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    first = run_job(args, timeout=180, env=env)
    assert first.returncode == 0 and os.path.isfile(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), \
        first.stderr[-3000:]
    again = run_job(args, timeout=180, env=env)
    assert again.returncode == 2 and "holds a run already: continue it with --resume" in again.stderr
    assert "Traceback" not in again.stderr and (tmp_path / "run" / "checkpoints" / "step-1").is_dir()


def test_a_missing_shard_is_one_line_before_any_process_group(tiny, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny["0801"], model)
    (model / "model-00002-of-00003.safetensors").unlink()
    for extra in ([], ["--resume"]):
        r = subprocess.run([sys.executable, "-m", "chatts_train", "--model_path", str(model), "--output_dir",
                            str(tmp_path / "run"), "--ds_config", os.path.join(ROOT, "ds_config.json"), *extra],
                           capture_output=True, text=True, timeout=300, env=_cpu_env())
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert ("the weight shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing: "
                "the download is incomplete, download it again") in r.stderr


def test_a_full_disk_during_a_save_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    from chatts_train.training.checkpoint import latest_resume, save_resume
    from chatts_train.errors import RankError

    root = tmp_path / "checkpoints"
    (root / "step-4" / "engine").mkdir(parents=True)
    (root / "step-4" / "engine" / "state.pt").write_bytes(b"x" * 5_000_000)
    (root / "latest").write_text("step-4\n")

    class FullDisk:
        def save_checkpoint(self, *args, **kwargs):  # what torch.save says when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                               "data/12: file write failed")

    with pytest.raises(RankError) as e:
        save_resume(FullDisk(), str(root), 6)
    text = str(e.value)
    assert text.startswith(f"disk full at {root / 'step-6.tmp'} writing the checkpoint of step 6")
    assert "a checkpoint needs ~5 MiB" in text and f"the last good checkpoint is {root / 'step-4'} (kept)" in text
    assert latest_resume(str(root)) == str(root / "step-4")  # still what --resume takes


def test_resume_without_a_latest_file_takes_the_newest_complete_checkpoint(tmp_path):
    from chatts_train.training.checkpoint import latest_resume
    from chatts_train.errors import CheckpointError

    root = tmp_path / "checkpoints"
    for d in ("step-2/engine", "step-6/engine", "step-8.tmp/engine", "step-7"):  # 8: unfinished; 7: no engine state
        (root / d).mkdir(parents=True)
    assert latest_resume(str(root)) == str(root / "step-6")
    with pytest.raises(CheckpointError, match="never saved one"):
        latest_resume(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_ranks_whose_launcher_was_killed_save_and_exit(tiny, tmp_path):
    """`kill -TERM <pid of deepspeed>` (a supervisor, with the launcher started directly as ChatTS-Training's
    scripts start it): launch.py and the ranks would train on; the ranks notice, save a resume checkpoint and
    exit. Nor do the known warnings that are not the user's to act on reach the output."""
    import signal
    import time

    from chatts_train.standins.synthetic import write_series_task

    write_series_task(str(tmp_path / "task.jsonl"), 48, length=120, seed=0)
    run = tmp_path / "run"
    job = start_job([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29547",
                     "--module", "chatts_train", "--model_path", tiny["0801"], "--data", str(tmp_path / "task.jsonl"),
                     "--output_dir", str(run), "--ds_config", os.path.join(ROOT, "ds_config.json"), "--fp16",
                     "false", "--offload", "none", "--max_steps", "200", "--save_steps", "0", "--plot", "false",
                     "--tensorboard", "false"], env=_cpu_env(), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:] if job.poll() else "slow"
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)  # the runner's pid alone
        job.wait(timeout=30)
        deadline = time.time() + 120
        while time.time() < deadline:  # launch.py and the ranks end after the checkpoint
            try:
                os.killpg(job.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("ranks still running two minutes after their launcher was killed")
        out = job.stdout.read()
    finally:
        kill_job(job)
    assert "[stop] the launcher is gone: saved a resume checkpoint at step" in out, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "engine").is_dir()
    assert "all_gather_into_tensor` is deprecated" not in out and "reduce_scatter_tensor` is deprecated" not in out
    assert "Could not find a config file" not in out  # PEFT's, at the adapter save of that checkpoint
