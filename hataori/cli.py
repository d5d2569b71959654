"""The ``hataori`` command: one console script with subcommands.

Each subcommand lives in the module that implements it; the module provides ``add_arguments(parser)``
and ``main(args)``. Commands are ``hataori GROUP COMMAND``, or ``hataori GROUP`` for a group that
is one command (its key in :data:`COMMANDS` is ``(group, None)``). Only the chosen subcommand's
module is imported, so ``hataori --help`` stays fast; modules keep inside their functions only what
is slow and not needed for their parser (deepspeed, triton, torch where the command can do without).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from hataori.errors import HataoriError

# (group, command) -> (module implementing it, one-line help); command None: the group is the command
COMMANDS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("corpus", "debian-ja"): ("hataori.corpus.debian_ja",
                              "build a Japanese corpus from Debian's Japanese documentation packages"),
    ("corpus", "ja-news"): ("hataori.corpus.ja_news",
                            "build news-style Japanese sentences (PyPI hironsancorpus) for out-of-domain evaluation"),
    ("corpus", "python-docs"): ("hataori.corpus.python_docs",
                                "English documentation text: the docstrings of Python's standard library"),
    ("corpus", "jglue-sft"): ("hataori.corpus.jglue_sft",
                              "an instruction set and preference pairs from JGLUE's training splits, decontaminated"),
    ("corpus", "decontaminate"): ("hataori.corpus.decontaminate",
                                  "find training records that share text with evaluation data (n-gram overlap)"),
    ("tokenizer", "train"): ("hataori.tokenizer.trainer", "train a SentencePiece tokenizer made for Japanese"),
    ("tokenizer", "extend"): ("hataori.tokenizer.extend",
                              "add a Japanese tokenizer's pieces to a base tokenizer (vocabulary expansion)"),
    ("tokenizer", "eval"): ("hataori.tokenizer.evaluate", "compare tokenizers on Japanese text"),
    ("data", "prepare"): ("hataori.data.prepare", "encode corpora into memory-mapped token shards"),
    ("data", "inspect"): ("hataori.data.shards", "describe a prepared dataset or shard"),
    ("data", "bench"): ("hataori.data.loader", "measure the blending, packing loader's tokens/s"),
    ("pretrain", None): ("hataori.train.pretrain", "pretrain a model from a preset on one or N processes"),
    ("sft", None): ("hataori.train.sft", "fine-tune a model on conversations (supervised fine-tuning)"),
    ("dpo", None): ("hataori.train.dpo", "preference optimisation on chosen/rejected pairs (DPO, SimPO)"),
    ("plan", None): ("hataori.plan.planner", "estimate per-GPU memory of a training run under each ZeRO setup"),
    ("generate", None): ("hataori.eval.generate", "continue a prompt with a trained checkpoint"),
    ("eval", None): ("hataori.eval.command",
                     "score a model on Japanese benchmarks (JCommonsenseQA, JNLI) or a corpus's bits per character"),
    ("export", "hf"): ("hataori.interop.export",
                       "write a run's checkpoint as a Hugging Face model folder (safetensors, tokenizer, model card)"),
    ("checkpoint", "verify"): ("hataori.checkpoint.verify",
                               "check a run's checkpoints against their manifests (sizes and checksums)"),
    ("slurm", "submit"): ("hataori.slurm.submit", "write a pretraining run's batch script and submit it to Slurm"),
    ("slurm", "status"): ("hataori.slurm.status", "show a run's Slurm job, last step and last complete checkpoint"),
}

GROUP_HELP = {
    "corpus": "build a corpus (the Debian Japanese documentation corpus for demos and tests)",
    "tokenizer": "train and evaluate SentencePiece tokenizers for Japanese",
    "data": "encode corpora into token shards and read them back",
    "pretrain": "pretrain a model from a preset on one or N processes",
    "sft": "fine-tune a model on conversations (supervised fine-tuning)",
    "dpo": "preference optimisation on chosen/rejected pairs (DPO, SimPO)",
    "plan": "estimate per-GPU memory of a training run under each ZeRO setup",
    "generate": "continue a prompt with a trained checkpoint",
    "eval": "score a model on Japanese benchmarks (JCommonsenseQA, JNLI) or a corpus's bits per character, offline",
    "export": "write trained models in other frameworks' layouts",
    "checkpoint": "check training checkpoints",
    "slurm": "run pretraining as Slurm jobs that checkpoint and requeue themselves at time limits",
}


def overview_parser() -> argparse.ArgumentParser:
    """The parser of ``hataori`` and ``hataori GROUP``: it lists commands and rejects unknown ones."""
    parser = argparse.ArgumentParser(prog="hataori", description="Pretraining framework for Japanese language models.")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    commands: dict[str, argparse._SubParsersAction] = {}
    for (group, command), (_, help_text) in COMMANDS.items():
        if command is None:
            groups.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group], add_help=False)
            continue
        if group not in commands:
            group_parser = groups.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
            commands[group] = group_parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
        commands[group].add_parser(command, help=help_text, description=help_text, add_help=False)
    return parser


def command_parser(group: str, command: str | None) -> tuple[argparse.ArgumentParser, Callable]:
    """The parser of one subcommand, built from its module, and the function that runs it."""
    module_name, help_text = COMMANDS[(group, command)]
    module = importlib.import_module(module_name)
    prog = f"hataori {group}" if command is None else f"hataori {group} {command}"
    parser = argparse.ArgumentParser(prog=prog, description=help_text)
    module.add_arguments(parser)
    return parser, module.main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and (argv[0], None) in COMMANDS:
        key, rest = (argv[0], None), argv[1:]
    elif tuple(argv[:2]) in COMMANDS:
        key, rest = (argv[0], argv[1]), argv[2:]
    else:
        overview_parser().parse_args(argv)  # prints usage or help and exits
        return 2
    parser, handler = command_parser(*key)
    # Intermixed parsing lets config files and key=value overrides stand before, between or after options.
    args = parser.parse_intermixed_args(rest)
    try:
        status = handler(args)
    except HataoriError as err:
        print(f"hataori: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hataori: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def run() -> None:
    """The ``hataori`` console script and ``python -m hataori.cli``: :func:`main`, its status the exit code. A
    process that ran a process group (a rank of a training run) leaves without the interpreter's finalization
    (:func:`hataori.train.zero.leave_process`)."""
    status = main()
    zero = sys.modules.get("hataori.train.zero")
    if zero is not None and zero.group_ended():
        zero.leave_process(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
