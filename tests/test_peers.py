"""The LLaMA-Factory peer's own arithmetic (benchmarks/llamafactory_peer.py): what it hands LLaMA-Factory and how
it counts; LLaMA-Factory itself runs on the GPU machine only."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import llamafactory_peer as peer  # noqa: E402


def test_the_checkpoint_is_seen_as_the_qwen2_it_holds(tiny, tmp_path):
    view = peer.text_view(tiny["0801"], str(tmp_path / "view"))
    config = json.load(open(os.path.join(view, "config.json")))
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert not set(peer.NOT_QWEN2) & set(config) and config["num_hidden_layers"] == 2
    index = os.path.join(view, "model.safetensors.index.json")
    assert os.path.islink(index) and os.path.realpath(index) == os.path.realpath(
        os.path.join(tiny["0801"], "model.safetensors.index.json"))
    assert peer.text_view(tiny["0801"], view) == view  # a second call finds its links in place


def test_tokens_per_second_leave_out_the_first_step_and_the_repeated_last_row():
    # LLaMA-Factory's trainer_log.jsonl: each step's tokens seen and throughput since training began; the run's
    # end logs its last step again
    rows = [{"current_steps": 1, "total_tokens": 12000, "throughput": 400.0},  # 30 s: the first step
            {"current_steps": 2, "total_tokens": 24000, "throughput": 24000 / 34},
            {"current_steps": 3, "total_tokens": 36000, "throughput": 36000 / 38},
            {"current_steps": 3, "total_tokens": 36000, "throughput": 36000 / 39}]
    tokens_per_s, step_s = peer.steady_rate(rows)
    assert tokens_per_s == pytest.approx(24000 / 8) and step_s == pytest.approx(4.0)
    with pytest.raises(RuntimeError, match="2 or more"):
        peer.steady_rate(rows[:1])
