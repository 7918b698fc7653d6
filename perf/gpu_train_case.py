"""Writes the GPU check's small training case into a folder: a counting corpus and its train.yaml.

    python perf/gpu_train_case.py DIR && megamath train --config DIR/train.yaml
"""
import sys

import numpy as np
import yaml

from megamath.data.indexed_dataset_writer import IndexedDatasetWriter


def main(root: str) -> None:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(f"{root}/counting", np.uint16) as writer:
        for _ in range(400):
            start, n = int(rng.integers(0, 4000)), int(rng.integers(64, 2048))
            writer.add_document((np.arange(start, start + n) % 4096).astype(np.uint16))
    config = {"model": {"vocab_size": 4096, "hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2,
                        "ffn_hidden_size": 1408, "max_seq_length": 1024},
              "data": {"data_path": [1, f"{root}/counting"], "seq_length": 1024},
              "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 5, "decay_steps": 20},
              "checkpoint": {"save_every": 10}, "run_dir": f"{root}/run", "micro_batch_size": 4, "train_steps": 20,
              "log_every": 5}
    with open(f"{root}/train.yaml", "w") as f:
        yaml.safe_dump(config, f)


if __name__ == "__main__":
    main(sys.argv[1])
