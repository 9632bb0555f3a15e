"""The processor against hand-computed cases of both releases, and the placeholder expansion."""
import math

import numpy as np
import pytest

from chatts_train.tokens import IGNORE_INDEX, TS_TOKEN_ID
from chatts_train.model.processor import chat_prompt, expand_placeholders
from chatts_train.model.timeseries import TSSpec, encoder_rows, normalise


def test_0801_prefix_matches_a_real_chatts_prompt(processors):
    t = np.arange(256)
    x = 5 * np.sin(t / 10)
    x[100:] -= 10
    out = processors["0801"](text="<ts><ts/>", timeseries=[x.tolist()], tokenize=False)
    assert out["text"][0].startswith("[offset=6.0772|scaling=3.6917|length=256|max=4.9979|min=-15.0000|")
    assert out["text"][0].endswith("]<ts><ts/>")


def test_hand_computed_prefixes_and_rows(processors):
    x = [0.0, 0.0, 0.0, 12.0]  # mean 3, max |x - mean| = 9 -> scale 3, z = [-1, -1, -1, 3]
    new = processors["0801"](text="a <ts><ts/> b", timeseries=[x], tokenize=False)["text"][0]
    assert new == "a [offset=-3.0000|scaling=3.0000|length=4|max=12.0000|min=0.0000|left=0.0000|right=12.0000]<ts><ts/> b"
    old = processors["legacy"](text="a <ts><ts/> b", timeseries=[x], tokenize=False)["text"][0]
    assert old == "a [Value Offset: -3.0000|Value Scaling: 3.0000]<ts><ts/> b"
    # small values are not scaled
    assert processors["legacy"](text="<ts><ts/>", timeseries=[[1, 2, 3, 4]], tokenize=False)["text"][0] == \
        "[Value Offset: -2.5000|Value Scaling: 1.0000]<ts><ts/>"

    z, _, _ = normalise(np.array(x))
    v, p = encoder_rows(z, processors["0801"].spec)  # patch 8, last-value padding, padding position 32768
    assert v.tolist() == [[-1, -1, -1, 3, 3, 3, 3, 3]]
    assert p.tolist() == [[0, 1, 2, 3, 32768, 32768, 32768, 32768]]
    v, _ = encoder_rows(z, processors["legacy"].spec)  # patch 16, zero padding
    assert v.tolist() == [[-1, -1, -1, 3] + [0] * 12]


@pytest.mark.parametrize("length,rel,n", [(1, "0801", 1), (8, "0801", 1), (9, "0801", 2), (5000, "0801", 625),
                                          (5000, "legacy", 313), (32768, "0801", 4096)])
def test_each_placeholder_becomes_ceil_l_over_patch_positions(processors, length, rel, n):
    proc = processors[rel]
    x = np.random.default_rng(0).normal(size=length).tolist()
    batch = proc(text=["see <ts><ts/> here"], timeseries=[x])
    ids = batch["input_ids"][0]
    assert int((ids == TS_TOKEN_ID).sum()) == n == math.ceil(length / proc.spec.patch_size)
    assert batch["ts_patches"].shape == (n, proc.spec.patch_size) == batch["ts_positions"].shape


def test_expand_rejects_broken_placeholders():
    with pytest.raises(ValueError):
        expand_placeholders([1, TS_TOKEN_ID, 2], [3])
    with pytest.raises(ValueError):
        expand_placeholders([1, TS_TOKEN_ID, TS_TOKEN_ID + 1], [])
    assert expand_placeholders([1, TS_TOKEN_ID, TS_TOKEN_ID + 1, 2], [3]) == [1] + [TS_TOKEN_ID] * 3 + [2]


def test_mixed_batch_positions_labels_and_masks(processors):
    proc = processors["0801"]
    rng = np.random.default_rng(1)
    samples = [proc.encode_chat("no series here", [], answer="ok"),
               proc.encode_chat("<ts><ts/> and <ts><ts/>", [rng.normal(size=20), rng.normal(size=3)], answer="two"),
               proc.encode_chat("one <ts><ts/>", [rng.normal(size=100)], answer="one series")]
    from chatts_train.model.batching import collate

    b = collate(samples, pad_id=proc.tokenizer.pad_token_id)
    assert b["input_ids"].shape == (3, max(len(s) for s in samples))
    # right-padded with labels: no mask (causal attention keeps real positions from the pads after them)
    assert "attention_mask" not in b
    assert (b["input_ids"] != proc.tokenizer.pad_token_id).sum(1).tolist() == [len(s) for s in samples]
    assert len(b["ts_patches"]) == 0 + (3 + 1) + 13
    assert (b["input_ids"] == TS_TOKEN_ID).sum(1).tolist() == [0, 4, 13]
    for i, s in enumerate(samples):
        labelled = b["labels"][i][b["labels"][i] != IGNORE_INDEX]
        answer = proc.tokenizer(["ok<|im_end|>\n", "two<|im_end|>\n", "one series<|im_end|>\n"][i],
                                add_special_tokens=False)["input_ids"]
        assert labelled.tolist() == answer  # labels only on the answer and its <|im_end|>\n
        assert not (b["labels"][i][b["input_ids"][i] == TS_TOKEN_ID] != IGNORE_INDEX).any()
    # left padding (generation) keeps each sample's `<ts>` run, only shifted
    left = collate(samples, pad_id=proc.tokenizer.pad_token_id, padding_side="left")
    assert (left["input_ids"] == TS_TOKEN_ID).sum(1).tolist() == [0, 4, 13]
    assert left["attention_mask"][:, -1].tolist() == [1, 1, 1]


def test_chat_template_is_chatts(processors):
    assert chat_prompt("Q") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ"
                                "<|im_end|>\n<|im_start|>assistant\n")
    tok = processors["0801"].tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ts>", "<ts/>"]) == \
        [151643, 151644, 151645, 151665, 151666]
    # Qwen2.5's real ids for the system prompt (the stand-in tokenizer is Qwen's BPE)
    assert tok("You are a helpful assistant.", add_special_tokens=False)["input_ids"] == [2610, 525, 264, 10950, 17847, 13]


def test_spec_from_config():
    assert TSSpec.from_ts_config({"patch_size": 8, "use_position_embedding": True, "max_sequence_length": 32768}).row_width == 136
    assert TSSpec.from_ts_config({"patch_size": 16, "max_length": 2048}).row_width == 16


def test_processor_call_pads_left_like_the_official_one_and_rejects_nan(processors):
    proc = processors["0801"]
    out = proc(["short <ts><ts/>", "a much longer question about <ts><ts/> here"], [[1.0, 2.0, 3.0], [4.0, 5.0]])
    assert out["attention_mask"][:, -1].tolist() == [1, 1] and out["attention_mask"][0, 0] == 0
    with pytest.raises(ValueError, match="non-finite value nan"):
        proc("x <ts><ts/>", [[1.0, float("nan")]])
    with pytest.raises(ValueError, match="non-numeric value True"):
        proc("x <ts><ts/>", [[True, 1.0]])


def official_prefix(timeseries) -> str:
    """The 0801 prefix as the official processor's `sp_encoding` writes it (CHATTS_FORMAT.md): statistics in
    the array's own dtype, max/min by Python's built-ins."""
    ts = np.array(timeseries)
    mean = np.mean(ts)
    scale = 1.0
    if np.any(np.abs(ts - mean) >= 3.0):
        scale = np.max(np.abs(ts - mean)) / 3.0
    return (f"[offset={-mean:.4f}|scaling={scale:.4f}|length={len(ts)}|max={max(ts):.4f}|min={min(ts):.4f}"
            f"|left={ts[0]:.4f}|right={ts[-1]:.4f}]<ts><ts/>")


def test_prefix_digits_match_the_official_processor_for_float32_and_signed_zeros(processors):
    proc = processors["0801"]
    x32 = (np.random.default_rng(0).normal(size=5000) * 50 + 1234.567).astype(np.float32)
    assert f"{-np.mean(x32):.4f}" != f"{-np.mean(x32.astype(np.float64)):.4f}"  # the case tells the two apart
    zeros = [np.array([0.0, -0.0, -1.0]), np.array([1.0, -0.0, 0.0])]  # np.max / np.min pick the other zero
    assert [f"{np.max(z):.4f}|{np.min(z):.4f}" for z in zeros] != [f"{max(z):.4f}|{min(z):.4f}" for z in zeros]
    for series in [x32, *zeros, [0.0, -0.0, -1.0]]:
        assert proc(text="<ts><ts/>", timeseries=[series], tokenize=False)["text"][0] == official_prefix(series)
    # the values the encoder sees are normalised in float32 too, as the official ones are
    z = proc(text="<ts><ts/>", timeseries=[x32], tokenize=False)["timeseries"][0]
    mean = np.mean(x32)
    assert z.dtype == np.float32 and np.array_equal(z, (x32 - mean) / (np.max(np.abs(x32 - mean)) / np.float32(3.0)))
