"""Generation, scoring, merge and adapter errors on the tiny checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from chatts_train.model.batching import collate
from chatts_train.errors import CheckpointError
from chatts_train.use.evaluate import keywords, numeric, score, score_by_dataset
from chatts_train.use.generate import generate, load_adapter, load_for_inference
from chatts_train.use.merge import merge
from chatts_train.model.modeling import load_model


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A LoRA adapter with non-zero weights (q/k/v + the encoder's Linear layers, rank 4), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(tiny["0801"], dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|k_proj|v_proj)$|^ts_encoder\.mlp\.\d*[02468]$"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = str(tmp_path_factory.mktemp("adapter") / "adapter")
    peft.save_pretrained(out)
    return out


QUESTIONS = [("Is there a spike in <ts><ts/>?", [np.sin(np.arange(300) / 7) * 3]),
             ("Compare <ts><ts/> with <ts><ts/>.", [np.arange(20.0), np.ones(90)]),
             ("No series here, just text.", [])]


def test_cached_generation_equals_uncached_reference(tiny, adapter):
    model, proc, device = load_for_inference(tiny["0801"], adapter, "cpu")
    for q in QUESTIONS:
        cached = generate(model, proc, [q], device, max_new_tokens=12)
        batch = collate([proc.encode_chat(q[0], q[1])], proc.tokenizer.pad_token_id, "left")
        with torch.no_grad():
            uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False,
                                      eos_token_id=[151645, 151643], pad_token_id=151643)
        tokens = proc.tokenizer.decode(uncached[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert cached == [tokens]
        assert len(tokens) > 0


def test_batched_equals_one_by_one(tiny, adapter):
    model, proc, device = load_for_inference(tiny["0801"], adapter, "cpu")
    together = generate(model, proc, QUESTIONS, device, max_new_tokens=10)
    alone = [generate(model, proc, [q], device, max_new_tokens=10)[0] for q in QUESTIONS]
    assert together == alone


def test_merged_checkpoint_equals_base_plus_adapter(tiny, adapter, processors, tmp_path):
    out = merge(tiny["0801"], adapter, str(tmp_path / "merged"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == \
        sorted(f for f in os.listdir(tiny["0801"]) if f.endswith(".safetensors"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isfile(os.path.join(out, "config.json"))
    proc = processors["0801"]
    batch = collate([proc.encode_chat(q, s, "an answer") for q, s in QUESTIONS], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        merged = load_model(out, dtype=torch.float32)(**batch)
        peft = load_adapter(load_model(tiny["0801"], dtype=torch.float32), adapter)(**batch)
        base = load_model(tiny["0801"], dtype=torch.float32)(**batch)
    # fp16 storage of the merged weights is the only difference
    torch.testing.assert_close(merged.logits, peft.logits, rtol=2e-2, atol=2e-2)
    assert (peft.logits - base.logits).abs().max() > 10 * (merged.logits - peft.logits).abs().max()


def test_bad_adapters_get_clear_errors(tiny, adapter, tmp_path):
    model = load_model(tiny["0801"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(model, str(tmp_path))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter, corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_adapter(model, str(corrupt))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        merge(tiny["0801"], str(corrupt), str(tmp_path / "m1"))
    # an adapter trained on another shape: the legacy encoder's first layer takes 16 inputs, not 136
    with pytest.raises(CheckpointError, match="another model shape"):
        load_adapter(load_model(tiny["legacy"], dtype=torch.float32), adapter)
    with pytest.raises(CheckpointError, match="another model shape"):
        merge(tiny["legacy"], adapter, str(tmp_path / "m2"))
    assert not os.path.exists(tmp_path / "m2") and not os.path.exists(tmp_path / "m2.tmp")  # nothing half-written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="exists already"):
        merge(tiny["0801"], adapter, str(tmp_path / "afile"))
    wrong_rank = tmp_path / "rank"
    shutil.copytree(adapter, wrong_rank)
    cfg = json.loads((wrong_rank / "adapter_config.json").read_text())
    cfg["r"] = 8
    (wrong_rank / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank 8 but the weights have rank"):
        load_adapter(model, str(wrong_rank))


def test_scoring_cases():
    assert score("Yes, a spike at around point 812.", "Yes, a spike at around point 812.")["exact"] == 1.0
    assert score("yes, a spike at around point 812", "Yes, a spike at around point 812.")["exact"] == 1.0
    assert keywords("There is a level shift.", "Yes, a level shift at around point 100.") == 1.0
    assert keywords("There is a spike.", "Yes, a level shift at around point 100.") == 0.0
    assert keywords("存在突刺异常", "存在突刺异常，大约发生在第557个点。") == pytest.approx(1 / 3)  # 1 of 3 CJK runs
    assert numeric("The maximum is about 90.", "The maximum is about 100.") == pytest.approx(0.9)
    assert numeric("about 250", "about 100") == 0.0  # clipped at 0
    assert numeric("no number", "value 5") == 0.0
    assert numeric("anything", "no numbers here") is None
    s = score_by_dataset([{"dataset": "a", "exact": 1.0, "keyword": 1.0, "numeric": None},
                   {"dataset": "b", "exact": 0.0, "keyword": 0.5, "numeric": 0.8}])
    assert s["all"] == {"samples": 2, "exact": 0.5, "keyword": 0.75, "numeric": 0.8, "numeric_samples": 1}


def test_generate_cli_with_prompt_and_csv_series(tiny, adapter, tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("a,b\n" + "\n".join(f"{i},{i * i}" for i in range(30)))
    out = tmp_path / "ans.jsonl"
    r = subprocess.run([sys.executable, "-m", "chatts_train.cli", "generate", "--model", tiny["0801"], "--adapter",
                        adapter, "--prompt", "Compare <ts><ts/> and <ts><ts/>.", "--series", str(csv),
                        "--max_new_tokens", "5", "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["prediction"] != ""
    bad = subprocess.run([sys.executable, "-m", "chatts_train.cli", "generate", "--model", tiny["0801"], "--adapter",
                          str(tmp_path / "nothing"), "--prompt", "hi", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_questions_get_file_line_reports_like_training(tiny, tmp_path):
    from chatts_train.errors import DataError
    from chatts_train.use.generate import read_questions
    from chatts_train.model.modeling import check_checkpoint

    spec = check_checkpoint(tiny["0801"]).ts_spec
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"input": "fine <ts><ts/>", "timeseries": [[1, 2, 3]]}, {"output": "no input"},
        {"input": "<ts><ts/>", "timeseries": [[1.0, float("nan")]]}, {"input": "two <ts><ts/><ts><ts/>", "timeseries": [[1]]}]))
    with pytest.raises(DataError) as e:
        read_questions(str(path), spec)
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert "no `input` text" in str(e.value) and "non-finite value nan" in str(e.value) and "2 `<ts><ts/>`" in str(e.value)


def test_a_truncated_shard_or_broken_config_is_named(tiny, tmp_path):
    from chatts_train.model.modeling import check_checkpoint
    from chatts_train.model.processor import ChatTSProcessor

    bad = tmp_path / "bad"
    shutil.copytree(tiny["0801"], bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt or truncated"):
        check_checkpoint(str(bad))
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["ts"]["patch_size"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks patch_size"):
        ChatTSProcessor.from_pretrained(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        check_checkpoint(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "ts": {**cfg["ts"], "patch_size": 8}}))
    (bad / "tokenizer.json").unlink()
    (bad / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        ChatTSProcessor.from_pretrained(str(bad))
