import json
import os

import pytest
import torch

from chatts_train.processor import ChatTSProcessor
from chatts_train.standins.checkpoint import make_tiny_checkpoint
from chatts_train.standins.synthetic import write_datasets

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny checkpoints of both releases: {"0801": path, "legacy": path}."""
    root = tmp_path_factory.mktemp("ckpt")
    return {rel: make_tiny_checkpoint(str(root / rel), rel) for rel in ("0801", "legacy")}


@pytest.fixture(scope="session")
def processors(tiny):
    return {rel: ChatTSProcessor.from_pretrained(path) for rel, path in tiny.items()}


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    return write_datasets(str(tmp_path_factory.mktemp("data")), {"gdsh": 6, "hbsn": 5, "whlj": 4, "zhlh": 5})


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
