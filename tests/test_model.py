"""The native model: published keys and shapes, the encoder against the official per-series code,
batch == one by one, and checkpoint errors."""
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatts_train.model.batching import collate, pack
from chatts_train.errors import CheckpointError
from chatts_train.model.modeling import ChatTSForCausalLM, load_model
from chatts_train.model.published import chatts_config


def published_keys(release, layers, hidden, inter, kv, vocab=152064):
    """The published state-dict list of shapes, written from the format description, not from our code."""
    first = 136 if release == "0801" else 16
    keys = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
                     p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
                     p + "self_attn.o_proj.weight": (hidden, hidden), p + "mlp.gate_proj.weight": (inter, hidden),
                     p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter),
                     p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    for j, k in enumerate((0, 2, 4, 6, 8)):
        keys[f"ts_encoder.mlp.{k}.weight"] = (hidden, first if j == 0 else hidden)
        keys[f"ts_encoder.mlp.{k}.bias"] = (hidden,)
    if release == "0801":
        keys["ts_encoder.position_embedding.weight"] = (32769, 16)
    return keys


@pytest.mark.parametrize("release", ["0801", "legacy"])
def test_tiny_checkpoint_has_published_keys_and_format(tiny, release):
    path = tiny[release]
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["architectures"] == ["Qwen2TSForCausalLM"] and "ts" in cfg
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) == 3
    model = load_model(path, dtype=torch.float32)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_keys(release, 2, 64, 128, 2 * 16)
    assert set(index["weight_map"]) == set(got)
    assert model.config._attn_implementation == "sdpa"


def test_sdpa_leaves_cudnn_attention_out():
    # cuDNN plans its attention kernel for every new sequence length (~0.14 s a 14B micro-step on H200)
    from chatts_train.model.modeling import pick_attention

    torch.backends.cuda.enable_cudnn_sdp(True)
    assert pick_attention("sdpa") == "sdpa" and not torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    assert pick_attention("eager") == "eager" and torch.backends.cuda.cudnn_sdp_enabled()


def test_14b_shape_from_config_has_published_keys():
    from chatts_train.model.published import chatts_config
    from chatts_train.model.modeling import ChatTSConfig

    cfg = chatts_config("0801", num_hidden_layers=1)  # one layer: same key pattern and shapes, small to build
    cfg.pop("model_type")
    with torch.device("meta"):
        model = ChatTSForCausalLM(ChatTSConfig(**cfg))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_keys("0801", 1, 5120, 13824, 1024)
    encoder = sum(v.numel() for k, v in model.state_dict().items() if k.startswith("ts_encoder"))
    assert 100e6 < encoder < 110e6  # ~105 M


def official_encoder(encoder, ts_cfg, series_list):
    """The official ChatTS encoder forward, per series on interleaved (value, mask) input, for reference."""
    p, use_pos = ts_cfg["patch_size"], ts_cfg.get("use_position_embedding", False)
    rows = []
    for z in series_list:
        x = torch.tensor(np.stack([z, np.ones_like(z)], -1), dtype=torch.float32)  # [L, 2]
        vl = int(x[:, 1].sum())
        pc = (vl + p - 1) // p
        xi = x[:vl, :1]
        pad = pc * p - vl
        pos = torch.arange(vl)
        if pad:
            xi = torch.cat([xi, xi[-1:].repeat(pad, 1) if use_pos else torch.zeros(pad, 1)])
            pos = torch.cat([pos, torch.full((pad,), ts_cfg.get("max_sequence_length", 0))])
        xi = xi.reshape(pc, p)
        if use_pos:
            xi = torch.cat([xi, encoder.position_embedding(pos.reshape(pc, p)).reshape(pc, -1)], -1)
        rows.append(xi)
    return encoder.mlp(torch.cat(rows))


@pytest.mark.parametrize("release", ["0801", "legacy"])
def test_encoder_sees_the_official_rows(tiny, processors, release):
    model = load_model(tiny[release], dtype=torch.float32)
    proc = processors[release]
    rng = np.random.default_rng(0)
    series = [rng.normal(size=n) * 10 for n in (1, 7, 8, 100, 5000)]
    batch = proc(text=["".join("<ts><ts/>" for _ in series)], timeseries=[s.tolist() for s in series])
    ours = model.ts_encoder(batch["ts_patches"], batch["ts_positions"])
    zs = proc(text=["".join("<ts><ts/>" for _ in series)], timeseries=[s.tolist() for s in series], tokenize=False)["timeseries"]
    ref = official_encoder(model.ts_encoder, model.config.ts, zs)
    torch.testing.assert_close(ours, ref)


def test_batch_equals_one_by_one_on_mixed_batches(tiny, processors):
    model = load_model(tiny["0801"], dtype=torch.float32).eval()
    proc = processors["0801"]
    rng = np.random.default_rng(2)
    samples = [proc.encode_chat("plain text, no series", [], "fine"),
               proc.encode_chat("<ts><ts/><ts><ts/><ts><ts/>", [rng.normal(size=n) for n in (3, 64, 17)], "three"),
               proc.encode_chat("long <ts><ts/>", [rng.normal(size=32768)], "long one"),
               proc.encode_chat("one point <ts><ts/>", [np.array([4.0])], "single")]
    pad = proc.tokenizer.pad_token_id
    with torch.no_grad():
        together = model(**collate(samples, pad))
        alone = [model(**collate([s], pad)) for s in samples]
        packed = model(**pack(samples, pad))
        # the plan's padding to a multiple (compiled layers: 8) changes nothing a position computes
        batches = [collate([s], pad, multiple=8) for s in samples] + [pack(samples, pad, 8)]
        assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)
        assert any(len(s) % 8 for s in samples) and sum(len(s) for s in samples) % 8  # so some were padded
        *padded, packed_padded = [model(**b) for b in batches]
    torch.testing.assert_close(together.loss_sum, sum(a.loss_sum for a in alone), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together.logits, torch.cat([a.logits for a in alone]), rtol=1e-4, atol=1e-4)
    # packing keeps attention inside each sample: same logits and loss as one by one
    torch.testing.assert_close(packed.logits, torch.cat([a.logits for a in alone]), rtol=1e-4, atol=1e-4)
    assert int(together.num_tokens) == sum(int(a.num_tokens) for a in alone)
    for a, p in zip(alone, padded):
        torch.testing.assert_close(p.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.loss_sum, a.loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_padded.logits, packed.logits, rtol=1e-5, atol=1e-5)


def test_batcher_indices_give_the_searched_steps_without_a_search(tiny, processors):
    from host_waits import HostWaits

    proc = processors["0801"]
    rng = np.random.default_rng(3)
    samples = [proc.encode_chat("<ts><ts/> and <ts><ts/>", [rng.normal(size=n) for n in (40, 9)], "two series"),
               proc.encode_chat("short <ts><ts/>", [rng.normal(size=70)], "one")]
    pad = proc.tokenizer.pad_token_id
    for batch in (collate(samples[:1], pad), pack(samples, pad), collate(samples, pad)):
        searched = {k: v for k, v in batch.items() if k not in ("ts_index", "answer_index")}
        grads = []
        for inputs in (batch, searched):
            model = load_model(tiny["0801"], dtype=torch.float32)
            with HostWaits() as searches:
                out = model(**inputs)
            out.loss_sum.backward()
            grads.append((out.loss_sum.detach(), model.model.layers[0].self_attn.q_proj.weight.grad,
                          model.ts_encoder.mlp[0].weight.grad, searches.seen))
        (loss, g, g_ts, seen), (ref_loss, ref_g, ref_g_ts, ref_seen) = grads
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_ts, ref_g_ts, rtol=1e-5, atol=1e-6)
        assert seen == []  # also micro-batch 2, padded: no mask for transformers to read
        assert {"aten.nonzero.default", "aten.index.Tensor"} <= set(ref_seen)  # the searches, caught here


def test_training_rows_get_causal_attention_and_packs_their_mask(tiny, processors, monkeypatch):
    # A materialised [seq x seq] mask sends SDPA to its masked kernel (1.7x the micro-step at 4,096 on an H200)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask is not None, kwargs.get("is_causal"), kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = load_model(tiny["0801"], dtype=torch.float32)
    proc = processors["0801"]
    rng = np.random.default_rng(4)
    samples = [proc.encode_chat("<ts><ts/> rising?", [rng.normal(size=40)], "yes"),
               proc.encode_chat("short <ts><ts/>", [rng.normal(size=9)], "no")]
    pad = proc.tokenizer.pad_token_id
    layers = model.config.num_hidden_layers
    gqa = model.config.num_key_value_heads < model.config.num_attention_heads
    model(**collate(samples[:1], pad))
    model(**collate(samples, pad))  # right-padded: real positions never see the pads after them
    assert calls == [(False, True, gqa)] * layers * 2
    calls.clear()
    model(**pack(samples, pad))  # attention must stay inside each sample: the block-diagonal mask is kept
    assert calls == [(True, False, False)] * layers


def test_loss_uses_only_answer_positions(tiny, processors):
    model = load_model(tiny["legacy"], dtype=torch.float32).eval()
    proc = processors["legacy"]
    b = collate([proc.encode_chat("x <ts><ts/>", [np.arange(40.0)], "answer here")], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**b)
        full = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    ref = F.cross_entropy(full[0, :-1].float(), b["labels"][0, 1:], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    assert out.logits.shape[0] == int((b["labels"] != -100).sum())


def test_encoder_runs_on_a_batch_without_series(tiny, processors):
    model = load_model(tiny["0801"], dtype=torch.float32)
    calls = []
    model.ts_encoder.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    b = collate([processors["0801"].encode_chat("no series", [], "ok")], 151643)
    model(**b).loss.backward()
    assert calls == [torch.Size([0, 64])]


def test_checkpoint_round_trip_and_errors(tiny, tmp_path):
    from chatts_train.standins.checkpoint import save_sharded

    model = load_model(tiny["0801"], dtype=torch.float32)
    out = tmp_path / "copy"
    shutil.copytree(tiny["0801"], out)
    for f in out.glob("model-*.safetensors"):
        f.unlink()
    sd = {k: v.half() for k, v in model.state_dict().items()}
    save_sharded(sd, str(out), 2)
    again = load_model(str(out), dtype=torch.float16)
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k]), k

    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="the weight shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing"):
        load_model(str(out))
    bad = tmp_path / "qwen"
    bad.mkdir()
    cfg = chatts_config("0801")
    cfg.pop("ts")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a ChatTS config"):
        load_model(str(bad))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path / "nowhere"))


def test_lora_targets_and_encoder_options(tiny):
    from chatts_train.training.config import TrainConfig
    from chatts_train.training.lora import add_lora

    def lora_modules(**kw):
        model = add_lora(load_model(tiny["0801"], dtype=torch.float32), TrainConfig(**kw), recompute_layers=0)
        names = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if ".lora_A" in n}
        return model, names

    _, names = lora_modules()
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")}
    _, names = lora_modules(lora_encoder=True, lora_targets="o_proj")
    assert names == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)} | {f"ts_encoder.mlp.{k}" for k in (0, 2, 4, 6, 8)}
    model, _ = lora_modules(train_encoder=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable and all(".ts_encoder." in n for n in trainable)


def test_pinned_chunks_pack_partitions_without_overlap_or_rounding():
    from chatts_train.fit.hostmem import PinnedChunks

    chunks = PinnedChunks(chunk_bytes=1 << 20, pin=False)  # pinning itself needs CUDA; the packing does not
    sizes = [300_000, 100_000, 200_000, 5, 700_000, 3_000_000, 1]  # fp16 elements; one is bigger than a chunk
    views = [chunks.place(torch.empty(n, dtype=torch.float16)) for n in sizes]
    assert [v.numel() for v in views] == sizes and all(v.dtype == torch.float16 for v in views)
    for i, v in enumerate(views):
        v.fill_(i)
    assert all(bool((v == i).all()) for i, v in enumerate(views))  # no view overwrote another
    assert all(v.data_ptr() % 64 == 0 for v in views)
    # two 1 MiB chunks first fit; the 1.4 MB and 6 MB partitions get chunks of their own (2 and 8 MiB)
    assert len(chunks.chunks) == 4 and chunks.reserved_bytes == 2 * (1 << 20) + (1 << 21) + (1 << 23)


def test_default_dtype_builds_in_the_runs_dtype_and_restores_torchs():
    from chatts_train.fit.loading import default_dtype

    with pytest.raises(RuntimeError), default_dtype(torch.float16):
        assert torch.nn.Linear(4, 4).weight.dtype == torch.float16  # zero.Init converts nothing then
        raise RuntimeError("a failed build")
    assert torch.get_default_dtype() == torch.float32


def _layer_step(layer, x, pe, pos, grad):
    """Output, input gradient, trainable-weight gradients, and bytes kept for backward (distinct storages
    other than the weights) of one decoder layer's forward + backward."""
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, position_embeddings=pe, position_ids=pos)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(grad)
    return y.detach(), x.grad, [p.grad for p in layer.parameters() if p.requires_grad], sum(kept.values())


def _qwen2_layer(dtype, device="cpu", train_norms=True):
    """A small Qwen2 decoder layer with frozen Linears (as under LoRA), and one step's inputs:
    (layer, x, position embeddings, positions, output gradient)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Config, Qwen2DecoderLayer, Qwen2RotaryEmbedding

    torch.manual_seed(0)
    hidden, inter, seq = 64, 172, 33
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(cfg, 0).to(device, dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    for name, p in layer.named_parameters():
        p.requires_grad = train_norms and "norm" in name  # the norms' weight gradient checked too
    x = (torch.randn(1, seq, hidden) * 3).to(device, dtype)
    pos = torch.arange(seq, device=device)[None]
    pe = [t.to(dtype) for t in Qwen2RotaryEmbedding(cfg).to(device)(x, pos)]
    return layer, x, pe, pos, torch.randn(1, seq, hidden).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lean_activations_match_transformers_and_keep_less(dtype):
    import copy

    from chatts_train.fit.lean_activations import keep_fewer_activations

    ref, x, pe, pos, grad = _qwen2_layer(dtype)
    seq, hidden = x.shape[1:]
    inter = ref.mlp.intermediate_size
    lean = copy.deepcopy(ref)
    assert keep_fewer_activations(lean) == 3  # the MLP and both norms
    y0, gx0, gw0, kept0 = _layer_step(ref, x, pe, pos, grad)
    y1, gx1, gw1, kept1 = _layer_step(lean, x, pe, pos, grad)
    assert torch.equal(y0, y1)  # the forward is transformers' own arithmetic
    if dtype == torch.float32:  # no cast node between the paths: autograd sums three gradients in another order
        torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
        for a, b in zip(gw1, gw0):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    else:  # what training runs (fp16 on the GPU): bit-identical
        assert torch.equal(gx0, gx1) and all(torch.equal(a, b) for a, b in zip(gw0, gw1))
    size = torch.finfo(dtype).bits // 8
    if dtype != torch.float32:
        # not kept any more: silu(gate), and each norm's fp32 copy of its input (its fp16 input instead)
        assert kept0 - kept1 >= seq * inter * size + 2 * seq * hidden * (4 - size)
    else:
        assert kept0 - kept1 >= seq * inter * size


@pytest.mark.slow  # compiling takes ~1 min on 2 CPU cores
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_kernels_match_the_eager_ones_and_compile_ahead(dtype):
    """The fused kernels are EAGER's Python compiled (by Inductor: C++ here, Triton on a GPU, where this test
    runs too): same results up to the intermediate roundings they skip. compile_ahead leaves nothing to
    compile in the steps: forward without autograd (the checkpointed pass), forward and backward under it,
    at lengths other than its own."""
    import copy

    from torch._dynamo.utils import counters

    from chatts_train.fit.lean_activations import EAGER, compile_ahead, fused_kernels, keep_fewer_activations, lean_modules

    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager, x, pe, pos, grad = _qwen2_layer(dtype, device, train_norms=False)  # frozen, as under LoRA
    fused = copy.deepcopy(eager)
    keep_fewer_activations(eager)
    assert keep_fewer_activations(fused, fused_kernels()) == 3 and lean_modules(fused, EAGER) == 0
    mlp, norm = fused.mlp, fused.input_layernorm
    compile_ahead(fused_kernels(), norm.weight.numel(), mlp.intermediate_size, norm.variance_epsilon, 29, dtype,
                  torch.device(device))
    graphs = counters["stats"]["unique_graphs"]
    for length in (x.shape[1], 20):
        s = slice(0, length)
        args = (x[:, s].contiguous(), [t[:, s] for t in pe], pos[:, s], grad[:, s].contiguous())  # as in a model
        with torch.no_grad():
            fused(args[0], position_embeddings=args[1], position_ids=args[2])
        y0, gx0, _, _ = _layer_step(eager, *args)
        y1, gx1, _, _ = _layer_step(fused, *args)
        for a, b in [(y1, y0), (gx1, gx0)]:
            # a few units in the last place of the tensor's largest value: roundings, not a different formula
            assert (a - b).abs().max() <= 4 * torch.finfo(dtype).eps * b.abs().max(), (length, dtype)
    assert counters["stats"]["unique_graphs"] == graphs  # all compiled ahead


def test_compiled_layers_take_float_attributes_as_constants():
    """A layer's floats (norm eps, attention scale and dropout) reach the compiled graph as constants, not as CPU
    scalar tensors: those gave the GPU graph a C++ kernel, whose compile and CPU probes cost ~25 s of every first
    step, even from Inductor's caches (benchmarks/RESULTS.md "A C++ kernel in a GPU graph")."""
    from chatts_train.fit.compiled_layers import compile_layers
    from chatts_train.fit.lean_activations import keep_fewer_activations

    layer, x, pe, pos, grad = _qwen2_layer(torch.float32, train_norms=False)
    keep_fewer_activations(layer)
    inputs = []

    def record(gm, example_inputs):
        inputs.extend(n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder")
        return gm.forward

    compile_layers([layer], backend=record)
    _layer_step(layer, x, pe, pos, grad)
    assert inputs, "nothing was compiled"
    scalars = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() == 0]
    assert not scalars, f"floats passed as scalar tensors: {scalars}"


def test_fused_kernels_that_fail_to_compile_stop_set_up_with_the_way_out(tiny, monkeypatch):
    import chatts_train.training.engine as engine
    from chatts_train.training.config import TrainConfig
    from chatts_train.errors import TrainingError
    from chatts_train.fit.lean_activations import Kernels
    from chatts_train.fit.plan import reference_plan

    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")

    monkeypatch.setattr(engine, "fused_kernels", lambda: Kernels(*(4 * [None])))
    monkeypatch.setattr(engine, "compile_ahead", no_compiler)
    with pytest.raises(TrainingError, match="C compiler.*--fused_kernels false") as e:
        # a plan with the fused kernels (as chosen on a CUDA card that compiles): set-up stops before the model loads
        engine.prepare_engine(TrainConfig(model_path=tiny["0801"]), {}, 10, replace(reference_plan(2), fused_kernels=True))
    assert "more" not in str(e.value)  # the first line of the cause, not its whole text


def test_whole_layer_gathers_keep_a_layer_from_recompute_to_backward(tiny):
    from chatts_train.fit.plan import Shape, apply_to_ds, reference_plan
    from chatts_train.training.engine import decoder_layers, gather_whole_layers

    model = load_model(tiny["0801"], dtype=torch.float32)
    layers = decoder_layers(model)
    numel = sum(p.numel() for p in layers[0].parameters())
    assert Shape.of(model.config).layer_numel == numel  # what the plan sizes the gathers with
    gather_whole_layers(model)
    assert all(getattr(m, "_z3_leaf", False) for m in layers)
    plan = replace(reference_plan(2), whole_layers=True, layer_numel=numel)
    zero = apply_to_ds(plan, {"zero_optimization": {"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 1000}})[
        "zero_optimization"]
    # reuse 0 would gather each layer 3x per micro-step (forward, recompute, backward): one layer's worth
    assert (zero["stage3_max_reuse_distance"], zero["stage3_max_live_parameters"]) == (int(1.1 * numel), int(2.2 * numel))
    zero = apply_to_ds(plan, {"zero_optimization": {"stage3_max_reuse_distance": 5e9}})["zero_optimization"]
    # larger settings and DeepSpeed's defaults stand
    assert (zero["stage3_max_reuse_distance"], zero["stage3_max_live_parameters"]) == (5e9, 1e9)


def test_selective_recompute_gives_the_gradients_of_full_recompute(tiny, processors):
    """Any number of recomputed layers (the first k; the rest keep their activations), with the recomputed
    layers' inputs on the host or not, computes the gradients of no recompute; only what waits for backward
    differs."""
    import numpy as np

    from chatts_train.model.batching import collate
    from chatts_train.training.config import TrainConfig
    from chatts_train.training.lora import add_lora

    processor = processors["0801"]
    rng = np.random.default_rng(0)
    batch = collate([processor.encode_chat("<ts><ts/> What is it?", [rng.normal(size=80)], "a spike")],
                    processor.tokenizer.pad_token_id)

    def grads(k, host=False):
        torch.manual_seed(0)
        model = add_lora(load_model(tiny["0801"], dtype=torch.float32), TrainConfig(), recompute_layers=k,
                         checkpoints_on_cpu=host)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave A without gradients
        model.train()
        layers = model.base_model.model.model.layers
        assert [bool(m.gradient_checkpointing) for m in layers] == [i < k for i in range(len(layers))]
        assert model.base_model.model.checkpoints_on_cpu == bool(k and host)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    none = grads(0)
    assert all(g.abs().sum() > 0 for g in none.values())
    for k, host in ((1, False), (2, False), (1, True), (2, True)):
        got = grads(k, host)
        assert all(torch.allclose(got[n], none[n], rtol=1e-5, atol=1e-7) for n in none), (k, host)
