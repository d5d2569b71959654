"""``PATH[:WEIGHT]`` items of the command line, as the source mappings configs hold.

Commands of every stage take them: ``hataori tokenizer train`` and ``hataori data prepare`` name
corpora with ``--input`` (``sources``), and ``hataori pretrain``, ``hataori data bench`` and
``hataori slurm submit`` name prepared datasets (``data.datasets``). The parsing lives here, below
all of them, so that training need not import the corpus readers to read its own flags.
"""

from __future__ import annotations


def parse_source(spec: str) -> dict:
    """``PATH[:WEIGHT]`` from the command line as a source mapping; a colon not followed by a
    number belongs to the path."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": spec}
