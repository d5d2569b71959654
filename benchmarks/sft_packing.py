"""How well conversations fill training rows: packed against one conversation a row.

    python benchmarks/sft_packing.py DATASET [--seq-len 2048] [--steps 50] [--rows-per-step 64]

DATASET is a folder from ``hataori data prepare --chat-template``. For each way of filling rows
(:mod:`hataori.data.examples`) it reads ``--steps`` optimizer steps of ``--rows-per-step`` rows and prints
the conversations a row, the share of positions whose target counts for the loss, the share that is
padding, and the rows an epoch of the dataset takes. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hataori.data.examples import ExampleLoader  # noqa: E402
from hataori.data.shards import Dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows-per-step", type=int, default=64)
    args = parser.parse_args(argv)
    data = Dataset(args.dataset, "train")
    lengths = data.lengths()
    print(f"{args.dataset}: {len(data):,} conversations, {int(lengths.sum()):,} tokens "
          f"(mean {lengths.mean():.1f}, longest {int(lengths.max())}); rows of {args.seq_len} positions, "
          f"{args.rows_per_step} a step, {args.steps} steps")
    for pack in (True, False):
        loader = ExampleLoader([data], seq_len=args.seq_len, batch_size=args.rows_per_step, pack_rows=pack)
        for _ in range(args.steps):
            loader.step_rows()
        stats = loader.stats.as_dict()
        per_epoch = len(data) / stats["examples_per_row"]
        print(f"  {'packed' if pack else 'one a row'}: {stats['examples_per_row']:.2f} conversations a row, "
              f"{stats['loss_share']:.1%} of positions carry the loss, {stats['padding_share']:.1%} are padding; "
              f"an epoch takes {per_epoch:,.0f} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
