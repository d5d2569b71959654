"""The ``hataori`` command: one console script with subcommands.

Each subcommand lives in the module that implements it; the module provides ``add_arguments(parser)``
and ``main(args)``. Only the chosen subcommand's module is imported, and modules keep heavy imports
(torch, deepspeed) inside their functions, so ``hataori --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hataori.errors import HataoriError

# (group, command) -> (module implementing it, one-line help)
COMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("corpus", "debian-ja"): ("hataori.tokenizer.debian_ja",
                              "build a Japanese corpus from Debian's Japanese documentation packages"),
    ("corpus", "ja-news"): ("hataori.tokenizer.ja_news",
                            "build news-style Japanese sentences (PyPI hironsancorpus) for out-of-domain evaluation"),
    ("tokenizer", "train"): ("hataori.tokenizer.trainer", "train a SentencePiece tokenizer made for Japanese"),
    ("tokenizer", "eval"): ("hataori.tokenizer.evaluate", "compare tokenizers on Japanese text"),
    ("data", "prepare"): ("hataori.tokenizer.prepare", "encode corpora into memory-mapped token shards"),
    ("data", "inspect"): ("hataori.tokenizer.shards", "describe a prepared dataset or shard"),
    ("data", "bench"): ("hataori.train.data", "measure the blending, packing loader's tokens/s"),
}

GROUP_HELP = {
    "corpus": "build a corpus (the Debian Japanese documentation corpus for demos and tests)",
    "tokenizer": "train and evaluate SentencePiece tokenizers for Japanese",
    "data": "encode corpora into token shards and read them back",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; the arguments of the subcommand named by ``argv`` are added from its module."""
    parser = argparse.ArgumentParser(prog="hataori", description="Pretraining framework for Japanese language models.")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    commands: dict[str, argparse._SubParsersAction] = {}
    for (group, command), (module_name, help_text) in COMMANDS.items():
        if group not in commands:
            group_parser = groups.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
            commands[group] = group_parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
        sub = commands[group].add_parser(command, help=help_text, description=help_text)
        if argv[:2] == [group, command]:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        status = args.handler(args)
    except HataoriError as err:
        print(f"hataori: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hataori: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
