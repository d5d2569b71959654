"""``hataori eval``: score a model on a Japanese benchmark or a corpus, offline.

    hataori eval MODEL --task NAME [--template NAME] [--shots K] [--seed S] [--data FILE]
        [--train FILE] [--limit N] [--batch-size B] [--output results.json [--replace]] [--device cpu]
        [--dtype fp32|bf16|fp16] [--chat]

MODEL is a run folder (its latest complete checkpoint), one of its ``checkpoints/step_N`` folders,
or a model folder in transformers' layout with its ``tokenizer.model`` (what ``hataori export hf``
writes; recognised by its ``config.json``). The tasks, templates and scoring are
:mod:`hataori.eval`'s; this command loads the model in ``--dtype`` (fp32 by default; a precision the
device cannot run is refused, :mod:`hataori.precision`) and calls :func:`hataori.eval.runner.run_task`,
which scores in fp32 whatever the model computes in.

The results (``--output``, JSON) hold what :func:`~hataori.eval.runner.run_task` returns and the
model: its path, kind, checkpoint and step, the dtype it computed in, and a fingerprint. A run's fingerprint hashes the
tokenizer's fingerprint and the checkpoint manifest's CRC (which covers every file of the
checkpoint); a Hugging Face folder's hashes the tokenizer's fingerprint, the SHA-256 of
``config.json`` and the CRC-32 of each weights file. One line goes to stdout: the scores and the
examples per second.

``--chat`` (generation tasks) renders each prompt as a user turn with the model's chat template: a
fine-tuning run's ``chat_template.jinja``, or the ``chat_template`` of an export's
``tokenizer_config.json``; the answer ends at the template's end of turn (:mod:`hataori.eval.generation`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from hataori.errors import ConfigError, InputError
from hataori.outputs import claim
from hataori.precision import DTYPES, PRECISIONS, torch_device
from hataori.precision import check as check_precision
from hataori.tokenizer.model import Tokenizer


def fingerprint(parts: dict[str, Any]) -> str:
    """A short hash of what identifies a model's function (see the module docstring)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_run(path: Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, model record) of a run folder or checkpoint folder."""
    # omegaconf and the model code load in ~0.15 s: when a model is loaded, not for `hataori eval --help`
    from hataori.checkpoint.manifest import read_manifest
    from hataori.interop.load import open_run

    run = open_run(path)
    tokenizer = run.tokenizer()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's prints; stdout carries the summary
        model = run.model(device, dtype)
    manifest = read_manifest(run.checkpoint)
    parts = {"tokenizer": tokenizer.fingerprint, "checkpoint_crc32": manifest["crc32"]}
    record = {"path": str(path.resolve()), "kind": "run", "checkpoint": str(run.checkpoint.resolve()),
              "step": manifest.get("step"), "fingerprint": fingerprint(parts), **parts}
    return model, tokenizer, record


def load_hf(folder: Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, model record) of a model folder in transformers' layout."""
    # omegaconf and the model code: see load_run
    from hataori.checkpoint.manifest import checksum
    from hataori.interop.hf import CONFIG_FILE
    from hataori.interop.load import HFSource, InitConfig, inference_model, load_initial_weights, open_source
    from hataori.model import ModelConfig

    source = HFSource(str(folder))
    cfg = ModelConfig(**source.fields)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise InputError(folder, f"tokenizer.model has {tokenizer.vocab_size} pieces, config.json's vocab_size is "
                         f"{cfg.vocab_size}: the tokenizer does not belong to the model")
    plan = open_source(InitConfig(from_hf=str(folder)), cfg, tokenizer)  # checks every weight's name and shape
    model = cfg.build()
    load_initial_weights(model, plan)
    files = sorted(set(source.checkpoint.weight_map.values()))
    parts = {"tokenizer": tokenizer.fingerprint,
             "config_sha256": hashlib.sha256((folder / CONFIG_FILE).read_bytes()).hexdigest(),
             "weights_crc32": {name: checksum(folder / name, sync=False)["crc32"] for name in files}}
    record = {"path": str(folder.resolve()), "kind": "hf", "checkpoint": None, "step": None,
              "fingerprint": fingerprint(parts), **parts}
    return inference_model(model, device, dtype), tokenizer, record


def load(path: str | Path, device: torch.device | str = "cpu", dtype: str = "fp32"):
    """(model, tokenizer, model record) of MODEL (see the module docstring); the model in eval mode,
    computing in ``dtype``."""
    from hataori.interop.hf import CONFIG_FILE  # omegaconf and the model code: see load_run

    path = Path(path)
    device = torch.device(device)
    model, tokenizer, record = (load_hf if (path / CONFIG_FILE).is_file() else load_run)(path, device, DTYPES[dtype])
    return model, tokenizer, {**record, "dtype": dtype}


def chat_template(path: str | Path):
    """The chat template of MODEL: a run's ``chat_template.jinja``, or an export's ``tokenizer_config.json``'s."""
    from hataori.interop.hf import CONFIG_FILE
    from hataori.tokenizer.chat import TEMPLATE_FILE, ChatTemplate

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        config = path / "tokenizer_config.json"
        has = config.is_file() and isinstance(json.loads(config.read_text(encoding="utf-8")).get("chat_template"), str)
        found = config if has else None
    else:
        from hataori.interop.load import open_run

        run_dir = open_run(path).run_dir
        found = run_dir / TEMPLATE_FILE if (run_dir / TEMPLATE_FILE).is_file() else None
    if found is None:
        raise ConfigError("--chat", f"{path} has no chat template (a run's {TEMPLATE_FILE}, an export's "
                          "tokenizer_config.json chat_template): it was not fine-tuned on conversations "
                          "(`hataori sft`); evaluate without --chat")
    return ChatTemplate.load(found)


def evaluate(model_path: str | Path, task: str, *, device: torch.device | str = "cpu", dtype: str = "fp32",
             chat: bool = False, **options) -> dict:
    """Load MODEL and run ``task`` on it (``options``: those of :func:`hataori.eval.runner.run_task`);
    the results with the model's record."""
    # omegaconf and the model code: see load_run
    from hataori.eval.runner import run_task
    from hataori.eval.tasks import get_task

    get_task(task)  # an unknown task is refused before the model is loaded
    check_precision(dtype, device, "--dtype")
    template = chat_template(model_path) if chat else None
    model, tokenizer, record = load(model_path, device, dtype)
    return {"model": record, **run_task(model, tokenizer, task, chat=template, **options)}


# ----------------------------------------------------------------------------- `hataori eval`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a run folder, its checkpoints/step_N folder, or a Hugging "
                        "Face model folder written by `hataori export hf`")
    parser.add_argument("--task", required=True, help="jcommonsenseqa, jnli, bpc (log-likelihood), or jsquad, "
                        "jcommonsenseqa-gen, jnli-gen (generated answers)")
    parser.add_argument("--template", help="a template name (configs/eval/NAME.yaml) or a YAML file "
                        "(default: the task's)")
    parser.add_argument("--shots", type=int, default=0, help="examples with their answers before each one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shots' draw")
    parser.add_argument("--data", help="evaluate this file instead of the task's (same format; bpc: a JSONL or "
                        "text corpus)")
    parser.add_argument("--train", help="draw shots from this file instead of the task's train file")
    parser.add_argument("--limit", type=int, default=0, help="only the first N examples (0: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences a forward pass")
    parser.add_argument("--output", help="write the results here (JSON)")
    parser.add_argument("--replace", action="store_true", help="replace an existing --output file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is one)")
    parser.add_argument("--dtype", default="fp32", choices=PRECISIONS, help="the precision the model computes in")
    parser.add_argument("--chat", action="store_true", help="generation tasks: each prompt a user turn rendered "
                        "with the model's chat template (a model fine-tuned with `hataori sft`)")


def main(args: argparse.Namespace) -> int:
    from hataori.eval.runner import summary  # omegaconf and the model code: see load_run

    with contextlib.ExitStack() as held:
        out = None
        if args.output:  # held from the start: a results file that cannot be written fails before the work
            out = held.enter_context(claim(args.output, "eval-results", is_dir=False,
                                           inputs=[p for p in (args.model, args.data, args.train) if p]))
            out.check_replace(args.replace)
        results = evaluate(args.model, args.task, device=torch_device(args.device), dtype=args.dtype,
                           template=args.template, shots=args.shots, seed=args.seed, data=args.data, train=args.train,
                           limit=args.limit, batch_size=args.batch_size, chat=args.chat)
        if out is not None:
            with out.file() as tmp:  # a full disk: an error naming the output (hataori.outputs)
                tmp.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(summary(results))
    return 0
