"""Generation throughput: megamath's KV-cache decoding against Hugging Face `generate`, same weights, same prompts.

    python perf/bench_generate.py                       # CPU smoke: the tiny shape, fp32
    python perf/bench_generate.py --shape 1b --batch 16 --prompt-len 512 --new-tokens 128   # on a GPU, bf16

Both models hold the same random weights (ours built by megamath, copied into `LlamaForCausalLM` by name)
and decode the same left-padded ragged batch greedily, with no EOS, so both produce exactly
`--new-tokens` tokens per row. Per model:

  prefill    seconds of `generate(max_new_tokens=1)` (the prompt's forward plus one token), and prompt
             tokens / s
  decode     (time(N) - time(1)) / (N - 1) per step, and generated tokens / s over the batch
  agree      share of generated tokens equal to HF's, position by position (1.0 in fp32; bf16 may
             drift after a near tie)

Napkin floor of a decode step on a GPU: it must read every weight once, so weight bytes / the copy
bandwidth measured at the start of the run (a 1 GiB device-to-device copy, read + write). Each timing is
the median of --repeats runs after one warm-up. Results print and go to perf/results/generate-DATE-DEVICE.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from megamath.generation.generate import SamplingParams, generate
from megamath.model import Llama, ModelConfig
from megamath.model.hf_llama import model_config_to_hf_config, to_hf_name

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": ModelConfig.from_preset("tiny", max_seq_length=1024),
    # TinyLlama's shape: GQA 32/4, 22 layers, 32,000 pieces.
    "1b": ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                      ffn_hidden_size=5632, max_seq_length=4096, rope_theta=1e4),
    "7b": ModelConfig.from_preset("llemma-7b"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (kernel compilation, allocator)
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a device-to-device copy (read + write counted), or None off the GPU."""
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 29, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    seconds, _ = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * x.element_size() / seconds


def build(shape: str, device: torch.device, dtype: torch.dtype):
    import transformers

    config = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):
        ours = Llama(config).to(dtype).eval()
    hf_config = transformers.LlamaConfig(**{k: v for k, v in model_config_to_hf_config(config, dtype).items()
                                            if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    hf.load_state_dict({to_hf_name(n): t for n, t in ours.state_dict().items()}, strict=True)
    return ours, hf


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_runner(hf, prompts, device):
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):], mask[b, longest - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)

    def run(n: int):
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, longest:].tolist()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: tiny on CPU, 1b on GPU")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 4 on CPU, 16 on GPU)")
    parser.add_argument("--prompt-len", type=int, default=None, help="longest prompt (default 64 CPU, 512 GPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 32 CPU, 128 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both models (default torch's; 1 on a machine shared with other jobs)")
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    shape = args.shape or ("1b" if gpu else "tiny")
    batch, plen, new = args.batch or (16 if gpu else 4), args.prompt_len or (512 if gpu else 64), \
        args.new_tokens or (128 if gpu else 32)
    dtype = torch.bfloat16 if gpu else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, hf = build(shape, device, dtype)
    prompts = prompts_for(batch, plen, SHAPES[shape].vocab_size)
    prompt_tokens = sum(map(len, prompts))
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bandwidth = copy_bandwidth(device)

    def ours_run(n: int):
        return [c.token_ids for c in generate(ours, prompts, SamplingParams(max_new_tokens=n))]

    rows = {}
    for name, run in (("megamath", ours_run), ("hf generate", hf_runner(hf, prompts, device))):
        t1, _ = timed(lambda: run(1), device, args.repeats)
        tn, tokens = timed(lambda: run(new), device, args.repeats)
        step = (tn - t1) / (new - 1)
        rows[name] = {"prefill_s": t1, "prefill_tok_s": prompt_tokens / t1, "step_ms": step * 1e3,
                      "decode_tok_s": batch / step, "tokens": tokens}
    reference = rows["hf generate"]["tokens"]
    for row in rows.values():
        same = sum(a == b for r, q in zip(row["tokens"], reference) for a, b in zip(r, q))
        row["agree"] = same / (batch * new)

    name = torch.cuda.get_device_name(device) if gpu else \
        f"CPU ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end: other " \
        "processes on the machine slow both models alike)"
    floor = f"{weight_bytes / bandwidth * 1e3:.3f} ms ({weight_bytes / 2**30:.2f} GiB of weights at " \
            f"{bandwidth / 1e9:.0f} GB/s)" if bandwidth else "n/a (no GPU: no bandwidth measured)"
    lines = [f"# Generation benchmark, {datetime.date.today()}", "",
             f"Device: {name}; dtype {str(dtype).removeprefix('torch.')}; shape `{shape}` "
             f"({ours.config.num_params() / 1e6:.1f} M parameters); batch {batch}, prompts {plen // 2}..{plen} "
             f"tokens ({prompt_tokens} in all), {new} new tokens per row, greedy; median of {args.repeats}.",
             f"Decode-step floor (weights read once): {floor}.", "",
             "| model | prefill s | prefill tok/s | decode ms/step | decode tok/s | agree with HF |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for model, row in rows.items():
        lines.append(f"| {model} | {row['prefill_s']:.4f} | {row['prefill_tok_s']:,.0f} | {row['step_ms']:.2f} | "
                     f"{row['decode_tok_s']:,.0f} | {row['agree']:.3f} |")
    ratio = rows["megamath"]["decode_tok_s"] / rows["hf generate"]["decode_tok_s"]
    lines += ["", f"megamath decode / HF decode: {ratio:.2f}x (above 1: megamath is faster)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"generate-{datetime.date.today()}-{'gpu' if gpu else 'cpu'}.md"
    path.write_text(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
