"""The training loop under 2-process ZeRO-3 on the CPU (see dist_scenarios.py for what runs)."""
import math

import pytest

pytestmark = pytest.mark.slow


def scenario(results, name):
    r = results[name]
    assert "error" not in r, r.get("trace", r)
    return r


def test_loss_falls_and_steps_are_micro_steps_over_accumulation(results):
    r = scenario(results, "interrupted_and_resumed")
    full = r["full"]
    assert [x["step"] for x in full] == [1, 2, 3, 4, 5]
    assert r["engine_counts"] == {"micro_steps": 40, "optimizer_steps": 5}  # engine.step() on every micro-step
    # 48 samples, micro-batch 1 x accumulation 8 x 2 ranks = 16 per optimizer step: 3 steps an epoch
    assert full[0]["epoch"] == pytest.approx(1 / 3, abs=1e-3)
    assert full[-1]["loss"] < full[0]["loss"]
    assert all(x["skipped"] == 0 and x["answer_tokens"] > 0 for x in full)
    # steps 1-3 are exactly one epoch: every one of the 48 samples once, all its positions counted
    assert r["task_samples"] == 48 and sum(x["tokens"] for x in full[:3]) == r["task_positions"]


def test_interrupted_and_resumed_run_matches_uninterrupted(results):
    r = scenario(results, "interrupted_and_resumed")
    # SIGTERM inside step 3: the step ends, the ranks agree to stop at step 4's start: 3 completed steps saved
    assert r["stopped"] == {"stopped_at": 3}
    assert r["rows_before_resume"] == 3
    assert [x["step"] for x in r["resumed"]] == [1, 2, 3, 4, 5]
    for a, b in zip(r["full"], r["resumed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["answer_tokens"] == b["answer_tokens"]
    assert "step-5" in r["ckpts"] and not any(c.endswith(".tmp") for c in r["ckpts"])
    assert "would not continue the same run" in r["resume_changed"]
    assert "gradient_accumulation_steps 8 -> 4" in r["resume_changed"] and "--seed 42 -> 7" in r["resume_changed"]
    assert "is cut short or corrupt (rank 0: engine/zero_pp_rank_0_" in r["broken_resume"]
    assert "rank 1: engine/zero_pp_rank_1_" in r["broken_resume"] and r["broken_setup_unchanged"]  # a failed start changes nothing
    # only rank 1's file cut short: both ranks stop with the one error naming it (no rank left waiting)
    assert len(set(r["one_rank_resume"])) == 1 and "(rank 1: engine/zero_pp_rank_1_" in r["one_rank_resume"][0]
    assert "rank 0:" not in r["one_rank_resume"][0]


def test_every_plan_computes_the_reference_steps(results):
    r = scenario(results, "plans")
    ref = r["reference"]
    assert ref["plan"]["zero_stage"] == 3 and not ref["plan"]["whole_layers"] and ref["setup"]["checkpointed_layers"] == 2
    # with the ZeRO stage left to it and memory to spare, the chooser takes the fastest: ZeRO-1, nothing
    # recomputed, and no ZeRO hook on any gradient (ZeRO-2 hooks each trainable tensor)
    assert r["auto"]["plan"]["zero_stage"] == 1 and r["auto"]["plan"]["recompute_layers"] == 0
    assert r["auto"]["setup"]["zero_stage"] == 1 and r["auto"]["setup"]["checkpointed_layers"] == 0
    assert r["auto"]["setup"]["gradient_hooks"] == 0 < r["zero2_selective"]["setup"]["gradient_hooks"]
    for name in PLAN_NAMES:
        got = r[name]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), name
        assert got["adapter_max_abs_diff"] <= 1e-5 * r["adapter_max_abs"], name
    # each pinned plan ran as pinned
    assert r["zero2_selective"]["setup"]["zero_stage"] == 2 and r["zero2_selective"]["setup"]["checkpointed_layers"] == 1
    assert r["auto"]["setup"]["compiled_layers"] == 0  # on the CPU the chooser does not compile
    assert r["zero1_compiled"]["setup"]["compiled_layers"] == 2 and r["zero1_compiled"]["plan"]["compile_layers"]
    # the run's summary says what compiling cost, and one graph served every layer and length: the first layer's
    # input like the others' (requiring grad, not a view) and every micro-step padded to the plan's multiple of 8
    compiled = r["zero1_compiled"]["compiled"]
    assert compiled["graphs"] == 1 and compiled["forward_s"] > 0 and compiled["fx_cache"], compiled
    assert compiled["phases_s"]["_compile.compile_inner"] > 0, compiled  # where the compiling went
    assert "bypass" not in compiled["aot_cache"], compiled  # the layers' graphs go to AOTAutograd's cache on disk
    assert r["zero2_compiled_selective"]["setup"]["checkpointed_layers"] == 1
    assert r["zero3_layers_host"]["setup"]["whole_layer_gathers"] and r["zero3_layers_host"]["setup"]["checkpoints_on_cpu"]
    assert not r["zero3_linear_host"]["setup"]["whole_layer_gathers"] and r["zero3_linear_host"]["setup"]["checkpoints_on_cpu"]
    assert r["zero3_offload_layers"]["setup"]["offload_param"] and r["zero3_layers_none"]["setup"]["checkpointed_layers"] == 0


PLAN_NAMES = ("auto", "zero2_selective", "zero1_compiled", "zero2_compiled_selective", "zero3_layers_none", "zero3_layers_host", "zero3_linear_host",
              "zero3_offload_layers")


def test_saved_adapter_reproduces_the_trained_model(results):
    r = scenario(results, "adapter_reproduces_engine")
    assert r["step"] == 5
    assert r["partitioned_shape"] == [[0]]  # really partitioned by ZeRO-3
    assert r["adapter_min_numel"] > 0 and r["adapter_nonzero_B"] > 0
    assert r["adapter_keys"][0].startswith("base_model.model.model.layers.0.self_attn.")
    assert "eval mode" in r["eval_mode_step"] and "engine.train()" in r["eval_mode_step"]
    for ours, peft, base in zip(r["engine"], r["peft"], r["base"]):
        assert peft == pytest.approx(ours, rel=1e-4)
        assert abs(peft - base) > 1e-4  # the adapter changes the outputs


def test_model_learns_from_the_series(results):
    r = scenario(results, "learns_from_series")
    assert r["rows"][-1]["loss"] < r["rows"][0]["loss"]
    assert r["accuracy"] >= 0.8, r  # chance is 0.5
    # with the series shuffled between samples the answers follow the wrong series
    assert r["shuffled"] <= 0.7 and r["shuffled"] <= r["accuracy"] - 0.2, r
    # --eval_at_end generated on the 32 held-out samples under ZeRO-3 (synced over both ranks) and scored them
    assert r["eval_at_end"]["all"]["samples"] == 32
    # --eval_at_start scored the same 32 before training: the summary holds both; greedy answers go from none
    # right to most right (what the demo in launch.sh shows with these settings)
    assert r["summary"]["held_out_before"]["samples"] == r["summary"]["held_out_after"]["samples"] == 32
    assert r["summary"]["held_out_before"]["exact"] <= 0.25 and r["summary"]["held_out_after"]["exact"] >= 0.75, r["summary"]
    # `eval --run DIR` finds the same model, adapter and 32 held-out samples from run.json alone
    assert r["eval_run"]["all"]["samples"] == 32 and r["eval_run_same_answers"]


def test_fp16_dynamic_loss_scaling_is_active(results):
    r = scenario(results, "fp16_loss_scaling")
    rows = r["rows"]
    assert rows[0]["loss_scale"] == 2 ** 16 and rows[0]["skipped"] == 0
    assert [x["skipped"] for x in rows] == [0, 1, 1, 0, 0]
    assert rows[1]["loss_scale"] == 2 ** 15 and rows[2]["loss_scale"] == 2 ** 14  # hysteresis 1: halves each time
    assert all(math.isfinite(x["loss"]) for x in rows)
    assert "loss scale reached its minimum" in r["min_scale"] and any(c.startswith("step-") for c in r["min_scale_ckpt"])
    assert "NaN/inf for 2 steps in a row" in r["nan"]


def test_packed_training_runs_several_samples_per_micro_step(results):
    r = scenario(results, "packed")
    # task samples are ~80-90 positions: 4 fit a 400-position pack; 2 micro-steps x 2 ranks per step
    assert r["summary"]["samples"] >= 2 * 2 * 2 * 3
    assert all(math.isfinite(x["loss"]) and x["answer_tokens"] >= 4 * 2 * 2 * 3 for x in r["rows"])


def test_batches_without_series_and_oom_reports(results):
    r = scenario(results, "robustness")
    assert [x["step"] for x in r["mixed_rows"]] == [1, 2] and all(math.isfinite(x["loss"]) for x in r["mixed_rows"])
    assert "CUDA out of memory at sequence length" in r["oom"] and "mixed.jsonl:" in r["oom"]
    assert "under the plan 'ZeRO-3, per-Linear gathers; recompute 2 layers'" in r["oom"] and "memprobe.py" in r["oom"]
    assert "no smaller plan exists" in r["oom"]  # the reference plan with offload pinned off is the smallest


def test_every_decoder_layer_trains_with_checkpointing_in_train(results):
    r = scenario(results, "training_mode_and_setup")
    assert r["micro_steps"] == 16 and r["layers"] == 2 and r["pairs"] == 32
    # forward + recompute: a layer run once per micro-step is not checkpointed (5x the activation memory)
    assert r["forwards_per_layer_and_micro_step"] == [2]
    assert r["all_training"]
    setup = r["setup"]
    assert setup["training"] and setup["checkpointed_layers"] == setup["decoder_layers"] == 2
    assert setup["checkpointing_reentrant"] is True and setup["input_requires_grad_hook"] is True
    # ZeRO-3's gradient bucket, allocated whole at start-up, holds no more than all trainable weights
    assert 0 < setup["gradient_bucket_numel"] == setup["trainable_numel"]
    # setup.json: the set-up the steps ran with, plus each rank's memory after set-up (host RSS, GPU peak)
    assert {k: v for k, v in r["recorded"].items() if not k.startswith(("host_", "setup_peak_"))} == setup
    assert len(r["recorded"]["setup_peak_allocated_gib"]) == 2


def test_partitions_read_from_the_shards_equal_transformers_loader(results):
    r = scenario(results, "loader_matches_transformers")
    for variant in ("persistence_0", "persistence_default", "offload_param"):
        assert r[variant]["params"] == 38 and r[variant]["abs_sum"] > 1.0, r
        assert r[variant]["max_abs_diff"] == 0.0, (variant, r[variant])
        # zero.Init's broadcast of every new parameter from rank 0 is skipped: the loader sets every value
        assert r[variant]["broadcast_numel"] == 0, (variant, r[variant])


def test_loss_is_the_token_mean_over_ranks_and_micro_steps(results):
    r = scenario(results, "loss_weighting")
    assert r["optimizer_steps"] == 1 and r["answer_tokens"] == r["expected_tokens"]
    # the same update as one process over the 8 samples; a wrong token scale (a constant factor, or a mean of
    # per-sample means with answers of 4 to 28 tokens) would be off by far more than this
    assert r["max_update"] > 1e-3 and r["max_abs_err"] < 1e-3 * r["max_update"], r


@pytest.mark.slow
def test_two_nodes_keep_zero3_gathers_inside_each_node(tiny, tmp_path):
    """2 nodes x 2 ranks on localhost (two torchrun launches): with ZeRO-3 pinned and the base fitting inside
    a node, the plan turns hpZ on, and the steps equal those of the same run without it."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import finish_job, kill_job, read_json, start_job
    from chatts_train.standins.synthetic import write_series_task

    write_series_task(str(tmp_path / "task.jsonl"), 48, length=120, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = os.path.join(os.path.dirname(__file__), "dist_scenarios.py")
    nodes = [start_job([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29535", script,
                        str(tmp_path), tiny["0801"], "hpz_two_nodes"], env=env, stderr=subprocess.STDOUT) for n in (0, 1)]
    try:
        logs = [finish_job(p, timeout=300).stdout for p in nodes]
    finally:  # the other node too, where the first one failed
        for p in nodes:
            kill_job(p)
    assert (tmp_path / "results.json").exists(), logs[0][-3000:]
    r = scenario(read_json(tmp_path / "results.json"), "hpz_two_nodes")
    assert r["hpz"]["plan"]["hpz_partition"] == 2 and r["hpz"]["engine_hpz"] == 2
    assert r["offload"]["engine_hpz"] == 1
    assert r["hpz"]["losses"] == pytest.approx(r["offload"]["losses"], rel=1e-5)
    assert all(x == x for x in r["hpz"]["losses"])  # no NaN: the node's copy of each weight was filled
    shutil.rmtree(tmp_path, ignore_errors=True)

