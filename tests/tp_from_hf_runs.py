"""The runs test_tp_from_hf.py compares, and the functions its gloo ranks run.

Apart from the test module because each spawned rank imports the module its function lives in: there, that
meant importing transformers (~2 s of CPU) in every one of six ranks that never use it.
"""
from pathlib import Path

from megamath.parallel.state import ParallelState
from megamath.training.config import TrainConfig
from megamath.training.loop import train
from test_train_loop import raw_config

STEPS, SAVE_AT, CLIP = 10, 5, 1.0
KV_CASES = {"kv2": 2, "kv3": 3}


def raw(tmp: Path, case: str, run: str, tp: int = 1, sp: bool = False, **top) -> dict:
    parallel = {"parallel__tp_size": tp, **({"parallel__sequence_parallel": True} if sp else {})}
    return raw_config(tmp / "data", tmp / case / run, train_steps=STEPS, init_from_hf=str(tmp / case / "hf"),
                      model__hidden_size=48, model__num_heads=6, model__num_kv_heads=KV_CASES[case],
                      model__rope_theta=1e6, model__max_seq_length=64, optimizer__clip_grad=CLIP,
                      checkpoint__save_every=SAVE_AT, **parallel, **top)


def tp2_worker(rank, world_size, tmp):
    state = ParallelState.from_env(2)
    for case in KV_CASES:
        train(TrainConfig.from_dict(raw(tmp, case, "tp2", 2)), state)
        train(TrainConfig.from_dict(raw(tmp, case, "tp2_sp", 2, sp=True)), state)
    resume = str(tmp / "kv2" / "tp2_sp" / "checkpoints" / f"step_{SAVE_AT:07d}")
    train(TrainConfig.from_dict(raw(tmp, "kv2", "tp2_sp_resumed", 2, sp=True, checkpoint__resume=resume)), state)


def tp2_dp2_worker(rank, world_size, tmp):
    train(TrainConfig.from_dict(raw(tmp, "kv2", "tp2_dp2_sp", 2, sp=True)), ParallelState.from_env(2))
