"""What the user sees when the job fails: one readable line per failing rank, no tracebacks."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_an_oom_on_rank_1_only_reaches_the_user_with_its_rank(tiny, tmp_path):
    data = tmp_path / "task.jsonl"
    from chatts_train.standins.synthetic import write_series_task

    write_series_task(str(data), 24, length=120, seed=0)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29541",
           os.path.join(ROOT, "tests", "fault_main.py"), "--model_path", tiny["0801"], "--data", str(data),
           "--output_dir", str(tmp_path / "run"), "--ds_config", os.path.join(ROOT, "ds_config.json"),
           "--fp16", "false", "--offload", "none", "--max_steps", "2", "--plot", "false", "--tensorboard", "false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert out.count("error (rank 1 of 2): CUDA out of memory at sequence length") == 1, out[-4000:]
    assert "task.jsonl:" in out and "--offload param" in out  # names the sample and what to try
    assert "Traceback" not in out, out[-4000:]


def test_a_missing_deepspeed_config_is_one_line_before_any_process_group(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "chatts_train", "--model_path", tiny["0801"], "--ds_config",
                        str(tmp_path / "nowhere.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert f"error: --ds_config {tmp_path / 'nowhere.json'}: no such file" in r.stderr
    assert "Traceback" not in r.stderr
