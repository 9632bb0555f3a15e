"""The run's configuration: parsed from the command line, checked as a whole before anything starts."""
import json
import os

import pytest
import torch

from chatts_train.training.config import TrainConfig, check_config, parse_config
from chatts_train.errors import ConfigError

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_every_problem_is_reported_at_once(tiny, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": -1, "gradient_accumulation_steps": "auto",
                              "fp16": {"enabled": True}, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    (tmp_path / "afile").write_text("x")
    cfg = TrainConfig(model_path=tiny["0801"], ds_config=str(ds), offload="param", lora_targets="q_proj,qkv",
                      attn_implementation="flash", learning_rate=0.0, output_dir=str(tmp_path / "afile"))
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    text = str(e.value)
    for part in ("train_micro_batch_size_per_gpu must be a positive integer, got -1", "fp16 and bf16 are both enabled",
                 "offload_param needs ZeRO stage 3", "--lora_targets 'q_proj,qkv'", "--attn_implementation 'flash'",
                 "--learning_rate 0.0: must be > 0", "is a file"):
        assert part in text, (part, text)
    assert len(e.value.problems) == 5  # the DeepSpeed file's three problems come as one line naming the file
    check_config(TrainConfig(model_path=tiny["0801"], ds_config=os.path.join(ROOT, "ds_config.json"),
                             output_dir=str(tmp_path / "run")))  # the shipped config is fine


def test_command_line_rejects_unknown_options_and_reads_booleans():
    cfg = parse_config(TrainConfig, ["--fp16", "false", "--packing", "--encoder_lr", "0", "--local_rank=1"])
    assert cfg.fp16 is False and cfg.packing is True and cfg.encoder_lr == 0.0
    with pytest.raises(ConfigError, match="unknown option.*--learing_rate"):
        parse_config(TrainConfig, ["--learing_rate", "1e-3"])


def test_an_encoder_lr_of_zero_freezes_the_encoder_instead_of_using_the_lr():
    from chatts_train.training.optim import make_optimizer

    model = torch.nn.Module()
    model.ts_encoder = torch.nn.Linear(2, 2)
    model.other = torch.nn.Linear(2, 2)
    wrapped = torch.nn.Module()
    wrapped.model = model  # names then contain ".ts_encoder."
    opt = make_optimizer(wrapped, TrainConfig(learning_rate=1e-4, encoder_lr=0.0), cpu_adam=False)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 0.0]


def test_package_names_load_lazily_and_light_modules_stay_light():
    import subprocess
    import sys
    import types

    code = "import sys, chatts_train.errors, chatts_train.cli; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # `chatts-train --help`, inspect-data --help and merge start without them
    import chatts_train
    import chatts_train.training.loop  # noqa: F401  (imports most submodules: none may shadow an exported name)

    for name in chatts_train.__all__:
        assert not isinstance(getattr(chatts_train, name), types.ModuleType), name


def test_an_output_dir_that_holds_a_run_is_not_overwritten_by_accident(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    base = dict(model_path=tiny["0801"], ds_config=os.path.join(ROOT, "ds_config.json"), output_dir=str(run))
    with pytest.raises(ConfigError, match="holds a run already: continue it with --resume"):
        check_config(TrainConfig(**base))
    check_config(TrainConfig(**base, overwrite_output_dir=True))
    check_config(TrainConfig(**base, resume=True))


def test_an_allocator_setting_that_cannot_act_is_named(monkeypatch):
    from chatts_train.training.engine import allocator_note

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,garbage_collection_threshold:0.7")
    assert "--gpu_memory_cap_gib" in allocator_note(None)
    assert allocator_note(22.0) is None  # under a cap it acts
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert allocator_note(None) is None


# The DeepSpeed files LLaMA-Factory (examples/deepspeed/) and ChatTS-Training ship: Trainer-style "auto" values
LF_Z3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                  "hysteresis": 2, "min_loss_scale": 1}, "bf16": {"enabled": "auto"},
         "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                               "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                               "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                               "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
         "comms_config": {"verbose": False}, "monitor_config": {"enabled": True, "tag": "DeepSpeedMonitor"}}
LF_Z2 = {**{k: v for k, v in LF_Z3.items() if k != "zero_optimization"},
         "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                               "overlap_comm": False, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                               "contiguous_gradients": True, "round_robin_gradients": True}}
WITH_OPTIMIZER = {**LF_Z3, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                                    "weight_decay": "auto"}},
                  "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                                    "warmup_num_steps": "auto", "total_num_steps": "auto"}}}


@pytest.mark.parametrize("shape", [LF_Z3, LF_Z2, WITH_OPTIMIZER], ids=["ds_z3", "ds_z2", "with_optimizer"])
def test_trainer_style_auto_values_take_the_runs_own(tiny, tmp_path, shape):
    from chatts_train.fit.dsconfig import run_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(shape))
    cfg = TrainConfig(model_path=tiny["0801"], ds_config=str(path), output_dir=str(tmp_path / "run"), grad_accum=4,
                      learning_rate=3e-4)
    check_config(cfg)  # before any process group
    ds = run_ds_config(cfg, 2, 64, torch.float16)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 4, 8)
    assert ds["gradient_clipping"] == 1.0 and ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # the run's AdamW and warmup + cosine instead
    zero = ds["zero_optimization"]
    if shape is not LF_Z2:
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
                zero["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)
    assert '"auto"' not in json.dumps(ds)
    on_cpu = run_ds_config(cfg, 1, 64, None)  # no fp16 on the CPU: fp32
    assert on_cpu["fp16"]["enabled"] is False and on_cpu["bf16"]["enabled"] is False


def test_an_auto_value_nothing_resolves_is_refused_naming_the_key(tiny, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**LF_Z3, "zero_optimization": {**LF_Z3["zero_optimization"], "sub_group_size": "auto"}}))
    with pytest.raises(ConfigError) as e:
        check_config(TrainConfig(model_path=tiny["0801"], ds_config=str(path), output_dir=str(tmp_path / "run")))
    assert '`zero_optimization.sub_group_size` is "auto"' in str(e.value) and len(e.value.problems) == 1


def test_chatts_training_command_lines_and_yaml_files_run_unchanged(tmp_path):
    """A ChatTS-Training user's options, as its scripts pass them to `deepspeed ... src/train.py`, mean the
    same run here; what we do not support is refused in one line naming each option and why."""
    theirs = ["--deepspeed", "ds_config_3.json", "--stage", "sft", "--do_train", "--model_name_or_path", "/m/ChatTS-14B",
              "--finetuning_type", "lora", "--lora_rank", "8", "--lora_target", "q_proj,k_proj,v_proj", "--dataset",
              "gdsh,hbsn", "--dataset_dir", "/data", "--template", "chatts", "--cutoff_len", "4000", "--output_dir",
              "saves/x", "--overwrite_output_dir", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
              "32", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--save_steps", "200", "--learning_rate",
              "1e-5", "--timeseries_sft_lr", "1e-5", "--warmup_ratio", "0.02", "--num_train_epochs", "3", "--plot_loss",
              "--fp16", "--save_only_model", "True", "--preprocessing_num_workers", "96", "--trust_remote_code", "True"]
    cfg = parse_config(TrainConfig, theirs)
    assert (cfg.ds_config, cfg.model_path, cfg.data, cfg.dataset_dir, cfg.cutoff_len) == (
        "ds_config_3.json", "/m/ChatTS-14B", "gdsh,hbsn", "/data", 4000)
    assert (cfg.micro_batch, cfg.grad_accum, cfg.learning_rate, cfg.encoder_lr, cfg.train_encoder) == (2, 32, 1e-5, 1e-5, True)
    assert (cfg.num_epochs, cfg.warmup_ratio, cfg.fp16, cfg.plot, cfg.overwrite_output_dir, cfg.lora_rank) == (
        3.0, 0.02, True, True, True, 8)
    assert cfg.lora_targets == "q_proj,k_proj,v_proj" and cfg.save_steps == 200
    yaml_file = tmp_path / "lora_sft.yaml"
    yaml_file.write_text("model_name_or_path: /m/ChatTS-14B\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
                         "lora_target: all\ndataset: gdsh\ntemplate: chatts\ncutoff_len: 4096\nbf16: true\n"
                         "per_device_train_batch_size: 1\nnum_train_epochs: 2.0\nflash_attn: sdpa\n")
    from_yaml = parse_config(TrainConfig, ["--from_llamafactory", str(yaml_file), "--num_train_epochs", "1"])
    assert from_yaml.lora_targets.split(",") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert from_yaml.bf16 is True and from_yaml.attn_implementation == "sdpa" and from_yaml.num_epochs == 1.0
    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, theirs + ["--quantization_bit", "4", "--finetuning_type", "full", "--warmup_steps", "10"])
    assert len(e.value.problems) == 1
    text = str(e.value)
    for part in ("--quantization_bit (QLoRA is not supported", "--finetuning_type full (we train LoRA adapters only",
                 "--warmup_steps (use --warmup_ratio"):
        assert part in text, text
    with pytest.raises(ConfigError, match="unknown option.*--no_such_option"):
        parse_config(TrainConfig, ["--no_such_option", "1"])
