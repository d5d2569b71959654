"""Time and memory of Hugging Face import (``init.from_hf``) and export (``hataori export hf``) for a
model of a preset's shape (default 1b: TinyLlama-1.1B), on this machine.

    python benchmarks/hf_import_export.py [--preset 1b] [--work DIR] [--max-shard-size 500MB]

Setup (not timed): a random LlamaForCausalLM of the shape written in bf16 by transformers, and a
one-process DeepSpeed ZeRO-0 bf16 checkpoint of a hataori run with those weights. Then, each in a
fresh process so that its peak is its own: the import (config read, model built in fp32, every
weight loaded) and the export of the run's checkpoint (bf16 shards). Memory is sampled every 20 ms
from /proc: anonymous memory (what the process allocated) and file-backed resident memory (pages
of the memory-mapped checkpoint it read; the kernel drops them under pressure). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak RssAnon and RssFile of this process, sampled in a thread."""

    def __init__(self, every: float = 0.02):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
            self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) * 1024)
            self.file = max(self.file, int(fields["RssFile"].split()[0]) * 1024)
            time.sleep(every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def model_config(preset: str):
    from hataori.config import load
    from hataori.model import ModelConfig

    return load(ModelConfig, [REPO / "configs" / "model" / f"{preset}.yaml"])


def setup(preset: str, work: Path) -> None:
    """The HF folder and the hataori run (in bf16), unless already there."""
    import torch

    from hataori.checkpoint.checkpointer import CheckpointConfig, Checkpointer
    from hataori.checkpoint.record import record_run
    from hataori.config import to_dict
    from hataori.interop.hf import hf_config_kwargs
    from hataori.train.optim import OptimConfig
    from hataori.train.zero import ZeroConfig, init_distributed

    cfg = model_config(preset)
    hf_dir, run_dir = work / "hf", work / "run"
    if not (hf_dir / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            hf = LlamaForCausalLM(LlamaConfig(**hf_config_kwargs(cfg), dtype=torch.bfloat16))
        hf = hf.to_empty(device="cpu").to(torch.bfloat16)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0.0, 0.02)
        hf.save_pretrained(hf_dir, max_shard_size="2GB")
        del hf
    if not (run_dir / "checkpoints").is_dir():
        env = init_distributed()
        zero = ZeroConfig(stage=0, precision="bf16", micro_batch_size=1, global_batch_tokens=256)
        model = cfg.build(env.device, torch.bfloat16)
        engine = zero.build(model, OptimConfig().build(model), None, seq_len=256, grad_clip=1.0)
        record_run(run_dir, {"model": to_dict(cfg), "tokenizer": str(work / "tokenizer.model"), "zero": to_dict(zero)})
        Checkpointer(CheckpointConfig(), run_dir / "checkpoints", engine).save(0, loader_state={})


def measure_import(work: Path) -> dict:
    import torch

    from hataori.interop.hf import HFCheckpoint, model_fields
    from hataori.interop.load import InitConfig, load_initial_weights, open_source
    from hataori.model import ModelConfig

    with PeakMemory() as peak:
        started = time.perf_counter()
        folder = work / "hf"
        cfg = ModelConfig(**model_fields(HFCheckpoint(folder).config, folder / "config.json"))
        plan = open_source(InitConfig(from_hf=str(folder)), cfg, None)
        model = cfg.build(dtype=torch.bfloat16)
        built = time.perf_counter()
        load_initial_weights(model, plan)
        seconds = time.perf_counter() - started
    return {"what": "import (build + load, bf16 model)", "seconds": seconds,
            "load_seconds": time.perf_counter() - built,
            "params": cfg.num_params(), "anon": peak.anon, "file": peak.file}


def measure_export(work: Path, max_shard_size: str) -> dict:
    from hataori.interop.export import export_hf, parse_size

    with PeakMemory() as peak:
        summary = export_hf(work / "run", work / "export", dtype="bf16", max_shard_bytes=parse_size(max_shard_size),
                            replace=True)  # a rerun with the same --work
    return {"what": f"export (bf16, {summary['shards']} shards of <= {max_shard_size})", "seconds": summary["seconds"],
            "bytes": summary["bytes"], "anon": peak.anon, "file": peak.file}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hataori-hf-bench"))
    parser.add_argument("--max-shard-size", default="500MB")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer of the preset's vocab_size for the export "
                        "(default: one is trained on the Debian corpus cache)")
    parser.add_argument("--step", choices=["setup", "import", "export"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "setup":
        setup(args.preset, args.work)
        return
    if args.step is not None:
        result = measure_import(args.work) if args.step == "import" else measure_export(args.work, args.max_shard_size)
        print(json.dumps(result))
        return
    tokenizer = args.work / "tokenizer.model"
    if not tokenizer.is_file():
        source = args.tokenizer or _train_tokenizer(args.work, model_config(args.preset).vocab_size)
        tokenizer.write_bytes((source / "tokenizer.model" if source.is_dir() else source).read_bytes())
    base = [sys.executable, __file__, "--preset", args.preset, "--work", str(args.work),
            "--max-shard-size", args.max_shard_size]
    subprocess.run([*base, "--step", "setup"], check=True)
    rows = [json.loads(subprocess.run([*base, "--step", step], check=True, capture_output=True,
                                      text=True).stdout.splitlines()[-1]) for step in ("import", "export")]
    print(f"{args.preset}: {model_config(args.preset).num_params():,} parameters")
    print(f"{'':44} {'seconds':>8} {'peak anon GiB':>14} {'peak file-backed GiB':>21}")
    for row in rows:
        print(f"{row['what']:44} {row['seconds']:8.1f} {row['anon'] / 2**30:14.2f} {row['file'] / 2**30:21.2f}")


def _train_tokenizer(work: Path, vocab_size: int) -> Path:
    corpus = Path.home() / ".cache" / "hataori-tests" / "debian-ja" / "corpus.jsonl"
    out = work / "tokenizer"
    subprocess.run([sys.executable, "-m", "hataori.cli", "tokenizer", "train", "--input", str(corpus), "--output",
                    str(out), f"vocab_size={vocab_size}", "progress=false"], check=True)
    return out


if __name__ == "__main__":
    main()
