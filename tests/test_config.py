"""The run's configuration: parsed from the command line, checked as a whole before anything starts."""
import json
import os

import pytest
import torch

from chatts_train.config import TrainConfig, check_config, parse_config
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
    from chatts_train.optim import make_optimizer

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
    import chatts_train.loop  # noqa: F401  (imports most submodules: none may shadow an exported name)

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
    from chatts_train.engine import allocator_note

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,garbage_collection_threshold:0.7")
    assert "--gpu_memory_cap_gib" in allocator_note(None)
    assert allocator_note(22.0) is None  # under a cap it acts
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert allocator_note(None) is None
