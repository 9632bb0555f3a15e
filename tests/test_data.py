"""Data pipeline: resolving datasets, every bad input, cutoff, split, weights, lazy reading, inspect-data."""
import json
import subprocess
import sys

import numpy as np
import pytest

from chatts_train.data.indexing import SampleReader, describe, epoch_order, index_data, resolve_sources, split
from chatts_train.errors import DataError
from chatts_train.model.processor import chat_prompt

from conftest import write_jsonl

GOOD = {"input": "look <ts><ts/>", "output": "fine", "timeseries": [[1.0, 2.0, 3.0]]}
BAD_LINES = {
    "invalid JSON": '{"input": "x", ',
    "missing field": json.dumps({"input": "x <ts><ts/>", "timeseries": [[1.0]]}),
    "wrong type": json.dumps({"input": "x <ts><ts/>", "output": 3, "timeseries": [[1.0]]}),
    "placeholder count": json.dumps({"input": "x <ts><ts/> <ts><ts/>", "output": "y", "timeseries": [[1.0]]}),
    "placeholder in output": json.dumps({"input": "x <ts><ts/>", "output": "y <ts><ts/>", "timeseries": [[1.0]]}),
    "empty series": json.dumps({"input": "x <ts><ts/>", "output": "y", "timeseries": [[]]}),
    "bad series": '{"input": "x <ts><ts/>", "output": "y", "timeseries": [[1.0, NaN]]}',
}
MORE_BAD_SERIES = [
    ([1.0, "2.0"], "non-numeric value '2.0'"),
    ([1.0, None], "non-numeric value None"),
    ([1.0, float("inf")], "non-finite value inf at point 1"),
    ([[1.0], [2.0]], "flat list"),
    (list(np.zeros(32769)), "longer than the encoder's 32768"),
    ([True, 1.0], "non-numeric value True"),  # numpy would have read it as 1.0
    ([1e308, 1e308, -1e308, 1e308], "overflows"),  # the prefix would say offset=-inf
]


def test_every_bad_sample_is_reported_with_file_line_and_reason(tmp_path, processors):
    rows = [GOOD] + list(BAD_LINES.values()) + [
        json.dumps({"input": "x <ts><ts/>", "output": "y", "timeseries": [s]}) for s, _ in MORE_BAD_SERIES] + [GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    index = index_data(resolve_sources(path), processors["0801"], cutoff_len=4096)
    assert len(index) == 2 and index.line.tolist() == [1, len(rows)]
    dropped = index.dropped[0]
    for reason in BAD_LINES:
        assert dropped[reason] >= 1, reason
    assert dropped["bad series"] == 1 + len(MORE_BAD_SERIES)
    for lineno, reason in enumerate(BAD_LINES, 2):
        assert any(p.startswith(f"{path}:{lineno}: {reason}:") for p in index.problems), reason
    for k, (_, detail) in enumerate(MORE_BAD_SERIES, 2 + len(BAD_LINES)):
        assert any(p.startswith(f"{path}:{k}: bad series:") and detail in p for p in index.problems), detail
    with pytest.raises(DataError, match=r"14 bad samples") as e:
        index_data(resolve_sources(path), processors["0801"], cutoff_len=4096, strict=True)
    assert f"{path}:2: invalid JSON" in str(e.value)


def test_legacy_has_no_length_limit(tmp_path, processors):
    path = write_jsonl(tmp_path / "long.jsonl", [{**GOOD, "timeseries": [list(np.zeros(40000))]}])
    assert len(index_data(resolve_sources(path), processors["legacy"], cutoff_len=10000)) == 1


def test_cutoff_counts_expanded_length_and_drops_whole_samples(tmp_path, processors):
    proc = processors["0801"]
    rows = [{**GOOD, "timeseries": [list(np.arange(n, dtype=float))]} for n in (8, 800, 8000)]
    path = write_jsonl(tmp_path / "lens.jsonl", rows)
    full = index_data(resolve_sources(path), proc, cutoff_len=100000)
    reader = SampleReader(full, proc)
    assert [len(reader[i]) for i in range(3)] == full.length.tolist()
    tok = proc.tokenizer
    for row, n_patches, length in zip(rows, (1, 100, 1000), full.length):
        text = proc(text=chat_prompt(row["input"]), timeseries=row["timeseries"], tokenize=False)["text"][0]
        text_tokens = len(tok(text + "fine<|im_end|>\n", add_special_tokens=False)["input_ids"])
        assert length == text_tokens - 2 + n_patches  # the <ts><ts/> pair becomes one position per patch
    cut = index_data(resolve_sources(path), proc, cutoff_len=int(full.length[1]))
    assert len(cut) == 2 and cut.dropped[0]["over cutoff"] == 1 and not cut.problems


def test_structural_errors_stop_before_training(tmp_path, synthetic, processors):
    with pytest.raises(DataError, match="unknown dataset 'nope'.*gdsh, hbsn, whlj, zhlh"):
        resolve_sources("gdsh,nope", synthetic)
    with pytest.raises(DataError, match="does not exist"):
        resolve_sources(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="dataset_info.json"):
        resolve_sources("gdsh", str(tmp_path))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "x.jsonl"}}))
    with pytest.raises(DataError, match="x.jsonl named in dataset_info.json does not exist"):
        resolve_sources("x", str(tmp_path))
    with pytest.raises(DataError, match="weight"):
        resolve_sources("gdsh:abc", synthetic)
    empty = write_jsonl(tmp_path / "allbad.jsonl", ["{oops"])
    with pytest.raises(DataError, match="no usable samples"):
        index_data(resolve_sources(empty), processors["0801"], 4096)


def test_columns_from_dataset_info(tmp_path, processors):
    write_jsonl(tmp_path / "c.jsonl", [{"q": "a <ts><ts/>", "a": "b", "ts": [[1.0, 2.0]]}])
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"c": {"file_name": "c.jsonl", "columns": {"prompt": "q", "response": "a", "timeseries": "ts"}}}))
    index = index_data(resolve_sources("c", str(tmp_path)), processors["0801"], 4096)
    assert len(index) == 1 and SampleReader(index, processors["0801"])[0].ts_patches.shape == (1, 8)


def test_split_weights_and_order_are_seeded(synthetic, processors):
    index = index_data(resolve_sources("gdsh:2,hbsn:0.4,whlj,zhlh", synthetic), processors["0801"], 8192)
    tr, va = split(index, 0.25, seed=3)
    tr2, va2 = split(index, 0.25, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2) and len(va) == 5 and not set(tr) & set(va)
    o1, o2 = epoch_order(index, tr, 3, 0), epoch_order(index, tr, 3, 0)
    assert np.array_equal(o1, o2) and not np.array_equal(o1, epoch_order(index, tr, 3, 1))
    per = {s: int((index.source[o1] == s).sum()) for s in range(4)}
    avail = {s: int((index.source[tr] == s).sum()) for s in range(4)}
    assert per[0] == 2 * avail[0] and per[1] == round(0.4 * avail[1]) and per[2] == avail[2]


def test_inspect_data_cli_prints_the_table(synthetic, tiny):
    out = subprocess.run([sys.executable, "-m", "chatts_train.cli", "inspect-data", "--model_path", tiny["0801"],
                          "--data", "gdsh,hbsn,whlj,zhlh", "--dataset_dir", synthetic, "--show", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("gdsh", "hbsn", "whlj", "zhlh"):
        assert f"\n{name} " in out.stdout
    assert "<ts x625>" in out.stdout and "You are a helpful assistant." in out.stdout
    stats = {d["dataset"]: d for d in describe(index_data(resolve_sources("gdsh", synthetic),
                                                          __import__("chatts_train").ChatTSProcessor.from_pretrained(tiny["0801"]), 4096))}
    assert stats["gdsh"]["series_length"]["max"] == 5000
    bad = subprocess.run([sys.executable, "-m", "chatts_train.cli", "inspect-data", "--model_path", tiny["0801"],
                          "--data", "nope", "--dataset_dir", synthetic], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: unknown dataset 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_schedule_and_packing_plan(synthetic, processors):
    from chatts_train.data.sampler import Sampler, pack_plan

    index = index_data(resolve_sources("gdsh,hbsn,whlj,zhlh", synthetic), processors["0801"], 8192)
    tr, _ = split(index, 0, seed=0)
    packs = pack_plan(index.length, epoch_order(index, tr, 0, 0), 4096)
    assert sorted(np.concatenate(packs).tolist()) == sorted(tr.tolist())  # every sample once per epoch
    assert all(index.length[p].sum() <= 4096 for p in packs) and len(packs) < len(tr)
    s = Sampler(index, tr, seed=0, micro_batch=1, world=2, grad_accum=2, pack_to=4096)
    steps0 = s.steps_in_epoch(0)
    assert s.locate(steps0) == (1, 0) and s.total_steps(2.0) == steps0 + s.steps_in_epoch(1)
    first = [s.micro_batches(0, r) for r in (0, 1)]
    # the run starts with its longest micro-step (a plan that does not fit fails at once); it trades places
    worst = max(range(len(packs)), key=lambda u: int(index.length[packs[u]].sum()))
    packs[0], packs[worst] = packs[worst], packs[0]
    assert first[0][0].tolist() == packs[0].tolist() and worst > 3
    assert sorted(p.tolist() for p in first[0] + first[1]) == sorted(p.tolist() for p in packs[:4])
    assert s.longest(s.total_steps(2.0)) >= int(index.length[packs[0]].sum())
    again = Sampler(index, tr, seed=0, micro_batch=1, world=2, grad_accum=2, pack_to=4096)
    assert [p.tolist() for p in again.micro_batches(steps0 - 1, 1)] == [p.tolist() for p in s.micro_batches(steps0 - 1, 1)]
    plain = Sampler(index, tr, seed=0, micro_batch=2, world=2, grad_accum=2)
    assert plain.steps_in_epoch(0) == -(-len(tr) // 8)
    assert all(len(ids) <= 2 for ids in plain.micro_batches(0, 0))


def test_bytes_ints_and_paths_that_used_to_raise_tracebacks(tmp_path, processors):
    path = tmp_path / "bytes.jsonl"
    with open(path, "wb") as f:
        f.write((json.dumps(GOOD) + "\n").encode())
        f.write(b'{"input": "caf\xe9 <ts><ts/>", "output": "y", "timeseries": [[1, 2]]}\n')
        f.write((json.dumps({**GOOD, "timeseries": [[1, 2 ** 70, 3]]}) + "\n").encode())
    index = index_data(resolve_sources(str(path)), processors["0801"], cutoff_len=4096)
    assert index.line.tolist() == [1, 3]  # a huge integer is a number; non-UTF-8 bytes are a bad sample
    assert any(p.startswith(f"{path}:2: not UTF-8:") for p in index.problems), index.problems
    with pytest.raises(DataError, match="is a folder"):
        resolve_sources(str(tmp_path))
    with pytest.raises(DataError, match="data file nope/train.json does not exist"):
        resolve_sources("nope/train.json")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"gdsh": "gdsh.jsonl"}))
    with pytest.raises(DataError, match="entry 'gdsh' must be an object"):
        resolve_sources("gdsh", str(tmp_path))
