"""logging.tensorboard_dir (Megatron-LM's --tensorboard-dir): the events in a folder of the user's choosing, which
one run claims, so that a second job pointed at it is refused instead of being drawn as the same run."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megamath.parallel.state import ParallelState
from megamath.training.config import LoggingConfig, TrainConfig
from megamath.training.loop import train
from megamath.training.tensorboard_log import CLAIM_NAME
from test_train_loop import metrics, raw_config, rewind


def config(tmp_path, run: str, events, **top) -> TrainConfig:
    return TrainConfig.from_dict(raw_config(tmp_path / "data", tmp_path / run, logging__tensorboard=True,
                                            logging__tensorboard_dir=str(events), **top))


def losses(folder) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in EventAccumulator(str(folder)).Reload().Scalars("loss")]


def test_the_events_go_to_the_folder_named_and_a_resume_writes_on(tmp_path):
    events = tmp_path / "tensorboard-server" / "run-a"
    run = config(tmp_path, "run", events)  # 8 steps, saved at 4 and 8
    train(run, ParallelState.single())
    assert (events / CLAIM_NAME).read_text().strip() == str((tmp_path / "run").resolve())
    assert not (tmp_path / "run" / "tensorboard").exists()
    rewind(tmp_path / "run", 4)  # killed after step 8's record, before its checkpoint: steps 5..8 again
    train(run, ParallelState.single())
    assert losses(events) == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics(tmp_path / "run")]
    assert [step for step, _ in losses(events)] == list(range(1, 9))


def test_a_second_run_is_refused_the_folder_and_changes_nothing(tmp_path):
    events = tmp_path / "tb"
    train(config(tmp_path, "first", events), ParallelState.single())
    before = sorted(p.name for p in events.iterdir()), losses(events)
    with pytest.raises(ValueError, match=rf"logging.tensorboard_dir {events} holds the events of the run in "
                                         rf"{tmp_path.resolve() / 'first'}: give this run its own folder") as err:
        train(config(tmp_path, "second", events), ParallelState.single())
    assert "\n" not in str(err.value)
    assert (sorted(p.name for p in events.iterdir()), losses(events)) == before
    assert not (tmp_path / "second" / "metrics.jsonl").exists()


def test_a_folder_holding_events_of_another_job_is_refused_and_left_as_it_was(tmp_path):
    events = tmp_path / "tb"
    events.mkdir()
    (events / "events.out.tfevents.1.host").write_bytes(b"not ours")
    with pytest.raises(ValueError, match=r"already holds TensorBoard events of another job "
                                         r"\(events.out.tfevents.1.host\), not claimed by a megamath run"):
        train(config(tmp_path, "run", events), ParallelState.single())
    assert [p.name for p in events.iterdir()] == ["events.out.tfevents.1.host"]


def test_a_folder_inside_the_run_directory_needs_no_claim(tmp_path):
    events = tmp_path / "run" / "events"
    train(config(tmp_path, "run", events, train_steps=2), ParallelState.single())
    assert [step for step, _ in losses(events)] == [1, 2] and not (events / CLAIM_NAME).exists()


@pytest.mark.parametrize("make, message", [
    (lambda t: (t / "f").write_text("x") and t / "f", r"logging.tensorboard_dir .*/f is a file, not a folder"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "tb", r"logging.tensorboard_dir .*/f/tb: cannot create it"),
])
def test_a_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, make, message):
    with pytest.raises(ValueError, match=message) as err:
        train(config(tmp_path, "run", make(tmp_path), train_steps=2), ParallelState.single())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fields, message", [
    ({"tensorboard_dir": "tb"}, "logging.tensorboard_dir is 'tb' but logging.tensorboard is false"),
    ({"tensorboard": True, "tensorboard_dir": ""}, "logging.tensorboard_dir must be a folder or null, got ''"),
    ({"tensorboard": True, "tensorboard_dir": 3}, "logging.tensorboard_dir must be a folder or null, got 3"),
])
def test_bad_settings_are_refused_with_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        LoggingConfig(**fields)


def test_the_default_folder_is_in_the_run_directory(tmp_path):
    assert LoggingConfig(tensorboard=True).tensorboard_path(tmp_path) == tmp_path / "tensorboard"
    assert LoggingConfig().tensorboard_path(tmp_path) is None
