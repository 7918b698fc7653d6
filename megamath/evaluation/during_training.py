"""Evaluation during training: the config's tasks on the model being trained, every eval_every steps.

Called by the training loop beside the validation loss; returns `{"eval/<task>/maj1": acc,
"eval/<task>/maj<k>": acc}` for metrics.jsonl. Every data-parallel rank takes its strided share of the
problems (rank d: problems d, d + dp, …), the TP ranks of its group decode them together, and the counts
of correct answers are summed over the DP group: every rank returns the same numbers. Seeds follow the
problem's index in the task, so the samples do not depend on the DP size.

A model trained with sequence parallelism is decoded through a second module without it that shares
the same parameter tensors (built on the meta device, no copy): decoding one token at a time cannot
split the sequence over ranks.
"""
from __future__ import annotations

import time

import torch

from megamath.evaluation.config import EvaluationConfig
from megamath.evaluation.runner import EvalSettings, evaluate
from megamath.evaluation.tasks import get_task
from megamath.generation.batching import PromptCodec
from megamath.parallel.mappings import all_reduce_


def _decoding_view(model):
    """`model` itself, or a sequence-parallel model's twin without sequence parallelism (shared tensors)."""
    if not model.sequence_parallel:
        return model
    from megamath.model.llama import Llama

    with torch.device("meta"):
        twin = Llama(model.config, model.parallel, sequence_parallel=False)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin


def check_task_inputs(config: EvaluationConfig) -> None:
    """Open the tokenizer and read every task's problems (and build one prompt) now, at the start of the run:
    a wrong path or --shots would otherwise stop training at its first evaluation, eval_every steps in."""
    if not config.tasks:
        return
    names = [task.name for task in config.tasks]
    for i, name in enumerate(names):
        if name in names[:i]:  # the later task's accuracy replaced the earlier's in the record, silently
            raise ValueError(f"evaluation.tasks[{i}]: a second {name} task; both would log eval/{name}/maj1 to "
                             f"metrics.jsonl, one overwriting the other: list each task once")
    from megamath.data.tokenizer import load_sentencepiece

    load_sentencepiece(config.tokenizer_model)
    for task_config in config.tasks:
        task = get_task(task_config.name)
        problems = task.read(config.data_path(task_config))
        if not problems:
            raise ValueError(f"evaluation task {task_config.name}: {config.data_path(task_config)} holds no problems")
        task.prompt(problems[0].question, task.shots if task_config.shots is None else task_config.shots)


@torch.no_grad()
def evaluate_tasks(model, config: EvaluationConfig, state, say=print) -> dict[str, float]:
    """Run every configured task once (collective over all ranks); the accuracies by metric name."""
    if not config.tasks:
        return {}
    from megamath.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(config.tokenizer_model)
    was_training = model.training
    decoder = _decoding_view(model).eval()
    metrics = {}
    try:
        for task_config in config.tasks:
            start = time.perf_counter()
            task = get_task(task_config.name)
            problems = task.read(config.data_path(task_config))[:task_config.limit]
            keys = state.dp_share(len(problems))
            max_new = task_config.max_new_tokens or task.max_new_tokens
            codec = PromptCodec(tokenizer, model.config.max_seq_length - max_new)
            settings = EvalSettings(task_config.shots, task_config.maj, config.temperature, config.top_p, max_new,
                                    config.seed, config.batch_size)
            results = evaluate(decoder, codec, task, [problems[k] for k in keys], settings, keys=keys)
            counts = torch.tensor([sum(r["correct"] for r in results), sum(r.get("correct_maj", False) for r in results),
                                   len(results)], dtype=torch.float64)
            if state.dp_size > 1:
                all_reduce_(counts, state.dp_group)
            total = max(counts[2].item(), 1.0)
            metrics[f"eval/{task_config.name}/maj1"] = counts[0].item() / total
            line = f"eval/{task_config.name}: maj@1 {counts[0].item() / total:.1%}"
            if task_config.maj > 1:
                metrics[f"eval/{task_config.name}/maj{task_config.maj}"] = counts[1].item() / total
                line += f"  maj@{task_config.maj} {counts[1].item() / total:.1%}"
            say(f"{line}  ({int(counts[2].item())} problems, {time.perf_counter() - start:.1f} s)")
    finally:
        model.train(was_training)
    return metrics
