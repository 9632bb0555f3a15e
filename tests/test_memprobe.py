"""The memory probe's report, verdict and config writing (a real 2-process run on the tiny model on CPU)."""
import json
import os
import sys

import pytest
from conftest import run_job

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import instruments  # noqa: E402
import memprobe  # noqa: E402


def probe(*args: str, port: str) -> dict:
    r = run_job([sys.executable, os.path.join(ROOT, "benchmarks", "memprobe.py"), *args, "--json"], timeout=300,
                env={**os.environ, "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.slow
def test_probe_runs_the_real_step_and_writes_the_verdict(tiny, synthetic, processors, tmp_path):
    from chatts_train.data.indexing import index_data, resolve_sources

    out = tmp_path / "ds_no_offload.json"
    rep = probe("--model_path", tiny["0801"], "--offload", "none", "--data", "hbsn", "--dataset_dir", synthetic,
                "--grad_accum", "2", "--steps", "1", "--write_config", str(out), "--compare_offload", "param",
                "--baseline", "hf", port="29622")
    index = index_data(resolve_sources("hbsn", synthetic), processors["0801"], 4096)
    assert rep["ok"] and rep["seq_len"] == int(index.length.max()) and rep["offload"] == "none"  # the longest sample
    assert [x["micro_steps"] for x in rep["ranks"]] == [2, 2] and all(x["optimizer_steps"] == 1 for x in rep["ranks"])
    assert rep["tokens_per_s_per_gpu"] > 0 and rep["estimated_job_s"] > 0
    assert rep["verdict"].startswith("offload can go")
    written = json.loads(out.read_text())
    assert "offload_param" not in written["zero_optimization"] and "offload_optimizer" not in written["zero_optimization"]
    assert written["_memprobe"]["verdict"] == rep["verdict"]
    # the same probe with parameter offload, for the step-time ratio
    assert rep["compare"]["offload"] == "param" and rep["compare"]["ok"] and rep["compare"]["step_time_ratio"] > 0
    # host RAM: the process itself, no pinned weights without offload
    assert rep["host_need"]["pinned_partition_gib"] == 0 and rep["host_need"]["per_rank_gib"] > 0
    # the usual recipe on the same weights and sample: transformers' full-vocabulary loss equals ours, computed
    # from each rank's slice of lm_head (vocab_parallel.py); it gathers the vocabulary matrices, we do not
    base = rep["baseline"]
    assert base["ok"] and base["recipe"] == "hf" and base["speedup"] > 0
    assert abs(base["losses"][0] - rep["losses"][0]) < 1e-4 * abs(rep["losses"][0])
    vocab_bytes = 2 * 152064 * 64 * 4 / 2  # embed_tokens + lm_head of the tiny model, fp32, half arrives per rank
    assert base["link_bytes_per_micro_step"]["all_gather"] - rep["link_bytes_per_micro_step"]["all_gather"] >= vocab_bytes


@pytest.mark.slow
def test_probe_sets_up_exactly_what_train_runs(tiny, results):
    """memprobe's engine, loaded from the folder or built from its config.json alone, is in the state train()'s
    engine is in at its first micro-step: training mode, checkpointing, dtypes, the same trainable weights."""
    from test_training import scenario

    trained = scenario(results, "training_mode_and_setup")["setup"]
    loaded = probe("--model_path", tiny["0801"], "--offload", "none", "--seq_len", "300", "--grad_accum", "1", "--steps",
                   "1", "--plan", "reference", port="29623")
    shape_only = probe("--model_path", "no-checkpoint-here", "--shape_config", os.path.join(tiny["0801"], "config.json"),
                       "--offload", "param", "--seq_len", "300", "--grad_accum", "1", "--steps", "1", "--plan",
                       "reference", port="29624")
    assert loaded["setup"] == trained
    assert shape_only["setup"] == {**trained, "offload_param": True}
    assert shape_only["host_need"]["pinned_partition_gib"] >= 0 and shape_only["ok"]


@pytest.mark.slow
def test_one_rank_of_two_runs_in_one_process_with_its_partitions(tiny):
    """--emulate-world 2: rank 0 of two under a fake process group holds half the base and steps alone."""
    common = ("--model_path", tiny["0801"], "--offload", "none", "--zero_stage", "3", "--gather_whole_layers", "true",
              "--seq_len", "300", "--grad_accum", "2", "--steps", "1")
    rep = probe(*common, "--emulate_world", "2", port="29625")
    assert rep["ok"] and rep["emulated_world"] == 2 and len(rep["ranks"]) == 1
    one = rep["ranks"][0]
    assert one["base_share_held"] == pytest.approx(0.5, abs=0.01) and one["optimizer_steps"] == 1
    assert "ZeRO-3, whole-layer gathers" in rep["plan_line"] and rep["sdpa_kernel"] in ("flash", "math")
    alone = probe(*common, "--num_gpus", "1", port="29626")["ranks"][0]
    assert alone["base_share_held"] == 1.0


def _args(tmp_path, **kw):
    """(training's options, the probe's own) as memprobe parses them."""
    return memprobe.parse(["--model_path", "no-checkpoint-here", "--gpu_memory_cap_gib", "22", "--write_config",
                           str(tmp_path / "out.json"), *[str(x) for kv in kw.items() for x in (f"--{kv[0]}", kv[1])]])


def _rank(r, **kw):
    base = dict(rank=r, ok=True, offload="none", gpu="NVIDIA H100 80GB HBM3", seq_len=4096, micro_step_s=1.0,
                first_step_done_s=30.0, device_peak_gib=17.0, peak_allocated_gib=15.0, peak_reserved_gib=16.0,
                alloc_retries=0, host_peak_gib=3.0, micro_steps=8, host_rss_after_load_gib=2.5)
    return {**base, **kw}


def test_verdicts_and_config(tmp_path):
    cfg, a = _args(tmp_path)
    fits = memprobe.summarise_probe(cfg, a, [_rank(0), _rank(1)], 60)
    assert fits["verdict"].startswith("offload can go") and fits["card"] == "h100"  # cards.py's name
    assert 0 < fits["mfu"] < fits["hfu"] < 1
    no_recompute = {"recompute_layers": 0, "zero_stage": 2}
    plain = memprobe.summarise_probe(cfg, a, [_rank(0, plan=no_recompute), _rank(1, plan=no_recompute)], 60)
    assert plain["hfu"] == plain["mfu"]  # nothing recomputed: no recompute FLOPs counted
    assert fits["estimated_job_s"] == round(421 * 3 / 2 * 1.0)  # samples x epochs / GPUs x micro-step time
    memprobe.write_config(cfg, a, fits)
    assert "offload_param" not in json.load(open(a.write_config))["zero_optimization"]

    over = memprobe.summarise_probe(cfg, a, [_rank(0), _rank(1, device_peak_gib=21.5)], 60)
    assert over["verdict"].startswith("keep offload") and "21.5" in over["verdict"]
    # the measured way under the budget: host checkpoints, the allocator's collection, NCCL channels
    assert all(k in over["verdict"] for k in ("--checkpoints_on_cpu", "garbage_collection_threshold", "NCCL_MAX_NCHANNELS"))
    memprobe.write_config(cfg, a, over)
    assert "offload_param" in json.load(open(a.write_config))["zero_optimization"]  # the users' config kept

    oom = memprobe.summarise_probe(cfg, a, [{"rank": 0, "ok": False, "oom": True, "micro_steps": 1, "offload": "none"},
                                 {"rank": 1, "ok": False, "error": "no result"}], 60)
    assert oom["verdict"].startswith("does NOT fit: out of memory after 0 micro-steps")
    assert "shorter --cutoff_len" in oom["verdict"]
    # a worker that crashed (here: it could not import deepspeed) is not an out-of-memory verdict
    crashed = memprobe.summarise_probe(cfg, a, [{"rank": 0, "ok": False, "crashed": True, "exit_code": 1, "error":
                                            memprobe.last_error("Traceback (most recent call last):\n  File x\n"
                                                                "ModuleNotFoundError: No module named 'deepspeed'\n")},
                                           {"rank": 1, "ok": False, "crashed": False, "exit_code": -9}], 60)
    assert crashed["verdict"] == ("the probe failed, so it says nothing of memory: rank 0 exited with code 1: "
                                  "ModuleNotFoundError: No module named 'deepspeed'")


def test_kernel_budget_splits_a_micro_step_into_compute_exposed_communication_copies_and_idle():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def kernel(name, start_us, end_us):
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=start_us, end=end_us))

    prof = SimpleNamespace(events=lambda: [kernel("sm90_xmma_gemm", 0, 10_000), kernel("ncclDevKernel_AllGather", 5_000, 15_000),
                                           kernel("Memcpy HtoD", 20_000, 22_000),
                                           # the memory-efficient kernel is a CUTLASS one, and it is attention
                                           kernel("fmha_cutlassF_f16_aligned_64x128_rf_sm80", 22_000, 23_000),
                                           kernel("pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel", 23_000, 24_000),
                                           SimpleNamespace(name="aten::mm", device_type=DeviceType.CPU, time_range=None)])
    b = instruments.kernel_budget(prof, wall_s=0.030)
    assert (b["gemm_s"], b["attention_s"], b["nccl_s"], b["copy_s"], b["kernels"]) == (0.01, 0.002, 0.01, 0.002, 5)
    assert b["gpu_busy_s"] == 0.019 and b["compute_busy_s"] == 0.012
    assert b["nccl_exposed_s"] == 0.005 and b["idle_s"] == 0.011  # the NCCL time no compute or copy overlaps


def test_steady_median_leaves_out_warm_up_and_the_profiled_micro_step():
    times = [9.0, 2.0, 2.0, 2.0, 1.0, 1.2, 15.0, 1.1]  # first optimizer step warms up; step 6 waited on rank 0's profiler
    assert instruments.steady_median(times, 4, 6) == 1.1
    assert instruments.steady_median(times, 4) == 1.2  # kept in, the waiting step moves the median


def test_a_worker_that_crashes_is_reported_as_a_crash_with_its_error(tiny, tmp_path):
    fake = tmp_path / "deepspeed"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('deepspeed is broken here (injected by the test)')\n")
    r = run_job([sys.executable, os.path.join(ROOT, "benchmarks", "memprobe.py"), "--model_path", tiny["0801"],
                 "--num_gpus", "1", "--seq_len", "200", "--json"], timeout=180,
                env={**os.environ, "PYTHONPATH": str(tmp_path), "MASTER_PORT": "29625"})
    rep = json.loads(r.stdout)
    assert not rep["ok"] and rep["verdict"].startswith("the probe failed, so it says nothing of memory: rank 0 "
                                                        "exited with code 1: ImportError: deepspeed is broken here")


@pytest.mark.slow
def test_loop_budget_profiles_one_whole_optimizer_step_of_the_real_loop(tiny, synthetic, tmp_path):
    out = tmp_path / "run"
    r = run_job([sys.executable, os.path.join(ROOT, "benchmarks", "loop_budget.py"), "--budget_step", "3",
                 "--model_path", tiny["0801"], "--data", "gdsh,hbsn", "--dataset_dir", synthetic,
                 "--output_dir", str(out), "--max_steps", "4", "--grad_accum", "2", "--save_steps", "0",
                 "--plot", "false", "--tensorboard", "false", "--fp16", "false"], timeout=180,
                env={**os.environ, "MASTER_PORT": "29561", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    budget = json.loads((out / "budget.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert budget["tokens"] == rows[2]["tokens"]  # the window is step 3, whole
    host = budget["host_s"]
    assert host["forward"] > 0 and host["backward"] > 0 and host["data"] > 0 and host["step_all_reduce"] > 0
    assert sum(host.values()) == pytest.approx(budget["wall_s"], abs=2e-3)  # every host second has a cause
    assert budget["wall_s"] >= rows[2]["step_time_s"]  # the window holds the step and the metrics line before it
    assert (out / "budget_trace.json").exists()
