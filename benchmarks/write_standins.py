"""The small stand-ins of HISTORY.md section 2's loop runs, in one folder: the tiny checkpoint (`tiny`), a 1.5 B
ChatTS shape with random weights (`mid`: Qwen2.5-1.5B sizes, the 0801 encoder), data of the users' shape
(`data_small`: 105 samples, 5,000-point series) and longer samples (`data_long`: 10,000-point series).

    python benchmarks/write_standins.py FOLDER
"""
from __future__ import annotations

import os
import sys
import time

from chatts_train.standins.checkpoint import make_tiny_checkpoint
from chatts_train.standins.synthetic import write_datasets


def main(folder: str) -> None:
    t = time.time()
    make_tiny_checkpoint(os.path.join(folder, "tiny"), "0801")
    write_datasets(os.path.join(folder, "data_small"), {"gdsh": 28, "hbsn": 24, "whlj": 27, "zhlh": 26}, 5000)
    make_tiny_checkpoint(os.path.join(folder, "mid"), "0801", num_shards=4, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_window_layers=28)
    write_datasets(os.path.join(folder, "data_long"), {"gdsh": 12, "hbsn": 12, "whlj": 12, "zhlh": 12}, 10000)
    print(f"stand-ins ready in {folder} in {time.time() - t:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
