"""Tokens/s of greedy generation: with the key/value cache, without it, and transformers' generate of the same weights.

    python benchmarks/generate_cache.py [--run RUN] [--preset configs/model/toy.yaml] [--batch 1]
        [--contexts 16,128,512] [--new 64] [--dtype fp32] [--threads N] [--skip-uncached-over 512]

The model is a run's (``--run``, through :func:`hataori.interop.load.open_run`), or a preset's with random
weights (``--preset``, default the main job's toy model; its ``max_seq_len`` is raised to fit the longest
context). For each context length (prompt tokens; a batch repeats random prompts of that length) it prints
the new tokens a second of:

- ``cached``: :func:`hataori.eval.generate.generate_batch` (prefill, then one position a step);
- ``uncached``: :func:`hataori.eval.generate.generate_uncached` (a full forward pass for every new token),
  batch 1 only, and skipped past ``--skip-uncached-over`` positions (quadratic: it is the slow reference);
- ``transformers``: ``LlamaForCausalLM.generate`` (greedy, its own dynamic cache) on the same weights,
  batch and dtype;

with the time to the first token (the prefill) and whether the three agree token for token, and the cache's
memory per token (:func:`hataori.model.cache.bytes_per_token`). Each figure is the best of three runs (the
uncached one: one run). It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hataori.config import int_list, load  # noqa: E402
from hataori.eval.generate import Sampling, generate_batch, generate_uncached  # noqa: E402
from hataori.interop.hf import hf_llama_config, to_hf_llama_state_dict  # noqa: E402
from hataori.model import ModelConfig  # noqa: E402
from hataori.model.cache import bytes_per_token  # noqa: E402
from hataori.precision import DTYPES  # noqa: E402

GREEDY = Sampling(greedy=True)


def best_of(runs: int, fn):
    """(the fastest of ``runs`` calls' seconds, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(runs):
        began = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - began)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder or checkpoint (default: the preset with random weights)")
    parser.add_argument("--preset", default="configs/model/toy.yaml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--contexts", type=int_list(), default=(16, 128, 512))
    parser.add_argument("--new", type=int, default=64, help="new tokens a prompt")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-uncached-over", type=int, default=512)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    longest = max(args.contexts) + args.new
    if args.run:
        from hataori.interop.load import open_run

        model = open_run(args.run).model(torch.device("cpu"), dtype)
    else:
        cfg = load(ModelConfig, [args.preset], [f"max_seq_len={max(longest, 256)}"])
        torch.manual_seed(0)
        model = cfg.build().to(dtype)
    model.eval()
    cfg = model.config
    if longest > cfg.max_seq_len:
        sys.exit(f"the longest context and its new tokens ({longest}) exceed the model's max_seq_len {cfg.max_seq_len}")
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_llama_config(cfg, bos_token_id=None, eos_token_id=None, pad_token_id=0))
    hf.load_state_dict(to_hf_llama_state_dict(cfg, model.state_dict()), strict=not cfg.tie_embeddings)
    hf = hf.to(dtype).eval()
    per_token = bytes_per_token(cfg, dtype)
    print(f"{args.run or args.preset}: {cfg.num_params():,} parameters, {cfg.n_layers} layers, {cfg.n_kv_heads} "
          f"key/value heads of {cfg.head_dim}; {args.dtype}, batch {args.batch}, {args.new} new tokens, "
          f"{torch.get_num_threads()} threads; the cache takes {per_token:,} bytes a position a row "
          f"({per_token * longest * args.batch / 2**20:.2f} MiB at {longest} positions)")
    for context in args.contexts:
        gen = torch.Generator().manual_seed(context)
        prompts = torch.randint(1, cfg.vocab_size, (args.batch, context), generator=gen)
        rows = prompts.tolist()
        cached_s, cached = best_of(3, lambda: generate_batch(model, rows, max_new_tokens=args.new, eos_id=None,
                                                             sampling=GREEDY))
        first_s, _ = best_of(3, lambda: generate_batch(model, rows, max_new_tokens=1, eos_id=None, sampling=GREEDY))
        with torch.no_grad():
            hf_s, out = best_of(3, lambda: hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                                       max_new_tokens=args.new, min_new_tokens=args.new,
                                                       do_sample=False, pad_token_id=0, eos_token_id=None))
        theirs = out[:, context:].tolist()
        tokens = args.batch * args.new
        line = (f"  context {context}: cached {tokens / cached_s:,.1f} tokens/s (first token {first_s * 1e3:.0f} ms); "
                f"transformers {tokens / hf_s:,.1f} tokens/s ({hf_s / cached_s:.2f}x the cached time); "
                f"same tokens as transformers: {theirs == cached}")
        if args.batch == 1 and context <= args.skip_uncached_over:
            plain_s, plain = best_of(1, lambda: generate_uncached(model, rows[0], max_new_tokens=args.new, eos_id=None,
                                                                  sampling=GREEDY))
            line += (f"; uncached {args.new / plain_s:,.1f} tokens/s (cached is {plain_s / cached_s:.1f}x faster, same "
                     f"tokens: {plain == cached[0]})")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
