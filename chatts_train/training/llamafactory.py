"""ChatTS-Training (LLaMA-Factory) settings taken as they are: its command-line options beside ours, or its
YAML file (`--from_llamafactory FILE.yaml`), each option mapped to ours or refused in one line that lists
the ones we do not support and why. Its DeepSpeed files' "auto" values are resolved in dsconfig.py."""
from __future__ import annotations

from typing import Optional

from ..errors import ConfigError

# their option -> ours (values as they are)
RENAMED = {
    "model_name_or_path": "model_path", "dataset": "data", "per_device_train_batch_size": "micro_batch",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "num_epochs", "deepspeed": "ds_config",
    "lora_target": "lora_targets", "save_total_limit": "keep_checkpoints", "timeseries_sft_lr": "encoder_lr",
    "train_timeseries_modules": "train_encoder", "plot_loss": "plot",
}
# options whose only accepted value is what we do
REQUIRED = {"stage": ("sft", "we train supervised fine-tuning only"),
            "finetuning_type": ("lora", "we train LoRA adapters only"),
            "template": ("chatts", "we render ChatTS's own chat template only"),
            "lr_scheduler_type": ("cosine", "our schedule is linear warmup then cosine"),
            "do_train": ("true", "this is a training run")}
# accepted, with nothing to do here, and why
NO_EFFECT = {
    "logging_steps": "every optimizer step is logged", "report_to": "metrics.jsonl, TensorBoard when installed",
    "preprocessing_num_workers": "the data is indexed once, on rank 0", "overwrite_cache": "there is no cache",
    "trust_remote_code": "the model is native here", "save_only_model": "resume checkpoints hold no frozen weights",
    "save_safetensors": "adapters are always safetensors", "save_strategy": "--save_steps", "ddp_timeout": "DeepSpeed's",
    "per_device_eval_batch_size": "held-out scoring generates in batches of 8", "bf16_full_eval": "",
}
# refused, and why (what to use instead)
REFUSED = {
    "quantization_bit": "QLoRA is not supported: the base stays fp16", "warmup_steps": "use --warmup_ratio",
    "resume_from_checkpoint": "use --resume with the run's --output_dir", "max_samples": "weight a dataset with name:weight",
    "eval_strategy": "use --val_size with --eval_at_end", "eval_steps": "use --val_size with --eval_at_end",
    "interleave_probs": "weight datasets with name:weight", "mix_strategy": "weight datasets with name:weight",
    "use_unsloth": "not supported", "pissa_init": "not supported", "use_dora": "not supported",
    "additional_target": "use --lora_encoder or --train_encoder", "freeze_vision_tower": "not a vision model",
}
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
FLASH = {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager", "auto": None}
BOOLEAN = {"fp16", "bf16", "overwrite_output_dir", "plot_loss", "do_train", "packing", "trust_remote_code",
           "overwrite_cache", "save_only_model", "save_safetensors", "train_timeseries_modules",
           "disable_gradient_checkpointing"}


def from_yaml(path: str) -> list[str]:
    """A LLaMA-Factory YAML file as command-line tokens."""
    import yaml

    try:
        with open(path) as f:
            options = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"--from_llamafactory {path}: {e}"]) from None
    if not isinstance(options, dict):
        raise ConfigError([f"--from_llamafactory {path}: not a mapping of options"])
    tokens = []
    for key, value in options.items():
        tokens += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return tokens


def translate(argv: list[str], ours: set[str]) -> list[str]:
    """`argv` with LLaMA-Factory's options put in our terms (ours and unknown ones pass through, for our
    parser to check); a ConfigError lists every option refused, with why."""
    if "--from_llamafactory" in argv:
        i = argv.index("--from_llamafactory")
        if i + 1 >= len(argv):
            raise ConfigError(["--from_llamafactory needs a YAML file"])
        argv = from_yaml(argv[i + 1]) + argv[:i] + argv[i + 2:]
    out, refused, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            out.append(token)
            continue
        name, _, inline = token[2:].partition("=")
        bare = not inline and (i >= len(argv) or argv[i].startswith("--"))
        if name in ours and name not in RENAMED:
            out += [token, "true"] if bare and name in BOOLEAN else [token]  # `--fp16` alone, as their scripts write it
            continue
        value: Optional[str] = inline or None
        if value is None and i < len(argv) and not argv[i].startswith("--"):
            value, i = argv[i], i + 1
        if value is None and name in BOOLEAN:
            value = "true"
        mapped = _map(name, value, refused)
        if mapped is None:  # unknown: our parser says so
            out += [token] + ([value] if value is not None and not inline else [])
        else:
            out += mapped
    if refused:
        raise ConfigError([f"options of ChatTS-Training / LLaMA-Factory this trainer does not support: "
                           f"{'; '.join(refused)}"])
    return out


def _map(name: str, value: Optional[str], refused: list[str]) -> Optional[list[str]]:
    if name in REFUSED:
        refused.append(f"--{name} ({REFUSED[name]})")
        return []
    if name in REQUIRED:
        want, why = REQUIRED[name]
        if str(value).lower() != want:
            refused.append(f"--{name} {value} ({why}: {want})")
        return []
    if name in NO_EFFECT:
        return []
    if name == "lora_target":
        return ["--lora_targets", ALL_LINEAR if value == "all" else str(value)]
    if name == "timeseries_sft_lr":  # ChatTS-Training trains the encoder beside LoRA, at this rate
        return ["--encoder_lr", str(value), "--train_encoder", "true"]
    if name == "disable_gradient_checkpointing":
        return ["--gradient_checkpointing", "false"] if str(value).lower() == "true" else []
    if name == "flash_attn":
        if value not in FLASH:
            refused.append(f"--flash_attn {value} (choose auto, fa2, sdpa or disabled)")
            return []
        return ["--attn_implementation", FLASH[value]] if FLASH[value] else []
    if name == "max_steps" and value is not None and value.lstrip("-").isdigit() and int(value) <= 0:
        return []  # their "no step limit"
    if name in RENAMED:
        return [f"--{RENAMED[name]}"] + ([value] if value is not None else [])
    return None
