"""examples/custom_loop.py, the public pieces put together by hand, runs under DeepSpeed's launcher."""
import glob
import os
import sys

import pytest
from conftest import run_job

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_custom_loop_example_trains_evaluates_and_saves(tiny, tmp_path):
    from chatts_train.standins.synthetic import write_series_task

    write_series_task(str(tmp_path / "task.jsonl"), 24, length=120, seed=0)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # DeepSpeed's shared-memory all-reduce names its segments by user, address and port (cpu_comm.py)
    segments = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29543_*"
    for stale in glob.glob(segments):
        os.remove(stale)
    r = run_job([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29543",
                 os.path.join(ROOT, "examples", "custom_loop.py"), "--model_path", tiny["0801"], "--data",
                 str(tmp_path / "task.jsonl"), "--output_dir", str(tmp_path / "run"), "--ds_config",
                 os.path.join(ROOT, "ds_config.json"), "--fp16", "false", "--offload", "none", "--max_steps", "2",
                 "--val_size", "4", "--eval_every", "1"], timeout=240, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "[plan] ZeRO-1 (base whole on each process)" in r.stdout  # the plan, in the CPU's words
    lines = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"] and all("held-out loss" in x for x in lines)
    assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    # nor was it built (the first run on a machine compiled it) or left segments behind in /dev/shm
    assert "shm_comm" not in r.stdout + r.stderr and not glob.glob(segments)
