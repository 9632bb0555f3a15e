"""The cards a run plans for: the attention each card's SDPA can serve, the card table and its emulation switches,
the memory and time of a plan on a named card (no process group, no model)."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from chatts_train.errors import ConfigError
from chatts_train.fit.cards import CARDS, card_named, resolve_card
from chatts_train.fit.plan import (Pins, Shape, choose, execute, job_time, named_cards, predict_peak_gib, run_cap_gib,
                                   step_time)
from chatts_train.model.attention import EXPANDED_KV, choose_attention, repeat_kv, sdpa_backend, sdpa_expanded_kv
from chatts_train.model.modeling import ChatTSConfig
from chatts_train.model.published import chatts_config

SHAPE = Shape.of(ChatTSConfig(**{k: v for k, v in chatts_config("0801").items() if k != "model_type"}), 2)


@pytest.mark.parametrize("capability,flash,fa2,requested,expected", [
    ((7, 5), False, False, None, EXPANDED_KV),  # a 2080 Ti: SDPA with GQA would be the math kernel
    ((7, 5), False, True, None, EXPANDED_KV),  # flash-attn installed does not run there
    ((7, 5), False, False, "sdpa", EXPANDED_KV),  # asked for sdpa, given the exact path that is not math
    ((8, 6), True, False, None, "sdpa"),  # a 3090: GQA inside the flash kernel
    ((9, 0), True, False, None, "sdpa"),
    ((9, 0), False, False, None, EXPANDED_KV),  # flash switched off (a smaller card played on an H200)
    ((8, 0), True, True, None, "flash_attention_2"),
    ((8, 0), True, True, "sdpa", "sdpa"),
    ((7, 5), False, False, "eager", "eager"),
    (None, True, False, None, "sdpa"),  # the CPU
])
def test_the_attention_each_card_can_serve(capability, flash, fa2, requested, expected):
    assert choose_attention(capability, flash, fa2, requested) == expected


def test_flash_attention_2_where_it_cannot_run_is_refused():
    with pytest.raises(ValueError, match="sm80"):
        choose_attention((7, 5), False, True, "flash_attention_2")


def test_expanded_kv_gives_the_gqa_result():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 37, 16, dtype=torch.float64), torch.randn(2, 2, 37, 16, dtype=torch.float64), \
        torch.randn(2, 2, 37, 16, dtype=torch.float64)
    module = torch.nn.Module()
    for mask in (None, torch.randn(2, 1, 37, 37, dtype=torch.float64)):
        got, _ = sdpa_expanded_kv(module, q, k, v, mask, scaling=0.25)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, is_causal=mask is None, enable_gqa=True)
        assert torch.allclose(got, want.transpose(1, 2), rtol=0, atol=1e-12)
    # each KV head serves its own group of query heads, in order
    assert torch.equal(repeat_kv(k, 4)[:, 4:8], k[:, 1:2].expand(2, 4, 37, 16))


def test_the_model_gives_the_same_logits_with_kv_expanded(tiny):
    from chatts_train.model.modeling import load_model

    model = load_model(tiny["0801"], dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 23))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: transformers builds a mask for the layers
    with torch.no_grad():
        want = [model(input_ids=ids).logits, model(input_ids=ids, attention_mask=mask).logits]
        model.config._attn_implementation = EXPANDED_KV
        got = [model(input_ids=ids).logits, model(input_ids=ids, attention_mask=mask).logits]
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


def test_the_dispatcher_is_asked_for_the_kernel():
    for attention in ("sdpa", EXPANDED_KV):
        assert sdpa_backend(attention, torch.device("cpu"), torch.float32, 40, 8, 128) in ("flash", "math")
    assert sdpa_backend("eager", torch.device("cpu"), torch.float32, 40, 8, 128) is None


def test_the_card_table_and_which_card_can_play_which():
    turing = card_named("2080ti")
    assert turing.capability == (7, 5) and not (turing.bf16 or turing.sdpa_flash or turing.compiles)
    assert all(c.bf16 and c.sdpa_flash for c in CARDS.values() if c.name != "2080ti")
    assert {"2080ti", "3090", "4090", "a100-40", "a100-80", "h100", "h200"} <= set(CARDS)
    assert card_named("2080 Ti") is turing and card_named("A100_40") is CARDS["a100-40"]
    with pytest.raises(ConfigError, match="choose auto .* 2080ti"):
        card_named("v100")
    assert resolve_card("auto", CARDS["h200"]) == (CARDS["h200"], False)
    assert resolve_card("2080ti", CARDS["h200"]) == (turing, True)  # played by the bigger card
    assert resolve_card("2080ti", turing) == (turing, False) and resolve_card("2080ti", None) == (turing, False)
    with pytest.raises(ConfigError, match="only play a smaller"):
        resolve_card("h200", turing)
    assert run_cap_gib("2080ti", None) == pytest.approx(turing.memory_gib - turing.context_gib)
    assert run_cap_gib("2080ti", 10.0) == 10.0 and run_cap_gib("auto", None) is None


def test_a_named_card_switches_off_what_it_lacks():
    turing = named_cards(card_named("2080ti"), 2, emulated=True)
    plan, _ = choose(SHAPE, turing, 4096, Pins())
    assert (plan.card, plan.emulated, plan.dtype, plan.attention) == ("2080ti", True, "float16", EXPANDED_KV)
    assert not (plan.sdpa_flash or plan.fused_kernels or plan.compile_layers)
    assert plan.gpu_memory_cap_gib == pytest.approx(21.4) and "as a 2080ti" in plan.line()
    assert plan.zero_stage == 3 and predict_peak_gib(plan, SHAPE, 2, 4096) < 0.95 * 21.4
    h200 = named_cards(card_named("h200"), 1)
    fast, _ = choose(SHAPE, h200, 4096, Pins())
    assert fast.sdpa_flash and fast.attention == "sdpa" and fast.fused_kernels is not fast.compile_layers
    with pytest.raises(ConfigError, match="no bf16"):  # a user's error: the CLIs print it in one line
        choose(SHAPE, turing, 4096, Pins(), dtype="bfloat16")
    flash_on, cudnn_on = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()
    try:
        execute(plan)
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
        execute(fast)
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(flash_on)
        torch.backends.cuda.enable_cudnn_sdp(cudnn_on)


def test_expanded_kv_keeps_the_expanded_heads_for_backward():
    plan, _ = choose(SHAPE, named_cards(card_named("2080ti"), 2, emulated=True), 4096, Pins(recompute_layers=24))
    gqa = replace(plan, attention="sdpa")
    extra = predict_peak_gib(plan, SHAPE, 2, 4096) - predict_peak_gib(gqa, SHAPE, 2, 4096)
    # 24 kept layers x 4,096 positions x (K and V: 5,120 instead of 1,024 values) x 2 bytes
    assert extra == pytest.approx(24 * 4096 * 2 * (5120 - 1024) * 2 / 1024 ** 3)


def test_a_micro_step_on_a_named_card_scales_compute_and_adds_its_links():
    h200, turing = named_cards(card_named("h200"), 1), named_cards(card_named("2080ti"), 2, emulated=True)
    whole, _ = choose(SHAPE, h200, 2158, Pins(compile_layers=False))
    on_h200 = step_time(whole, SHAPE, h200, 2158)
    assert on_h200.gpu_link_s == on_h200.host_link_s == 0 and on_h200.bound == "compute"
    users, _ = choose(SHAPE, turing, 2158, Pins())
    t = step_time(users, SHAPE, turing, 2158)
    # one rank receives half of the 48 layers twice a micro-step over ~10 GB/s
    assert t.gpu_link_s == pytest.approx(2 * SHAPE.layers * SHAPE.layer_numel * 2 / 2 / 10e9)
    assert t.compute_s > 8 * step_time(replace(users, attention="sdpa", sdpa_flash=True), SHAPE,
                                       named_cards(card_named("h200"), 2), 2158).compute_s
    assert t.total_s == max(t.compute_s, t.gpu_link_s + t.host_link_s)
    slow_link = replace(turing, card=replace(card_named("2080ti"), peer_gbps=0.5))
    assert step_time(users, SHAPE, slow_link, 2158).bound == "GPU link"
    seconds, bound = job_time(users, SHAPE, turing, [2158, 1400, 1400])
    assert seconds == pytest.approx(step_time(users, SHAPE, turing, 2158).total_s
                                    + 2 * step_time(users, SHAPE, turing, 1400).total_s) and bound == "compute"
