"""The JGLUE v1.3 files hataori ships (``hataori/corpus/jglue/``, CC BY-SA 4.0, with their README and LICENSE):
read by the evaluation tasks (:mod:`hataori.eval.tasks`), the instruction set built from the training splits
(:mod:`hataori.corpus.jglue_sft`) and its decontamination against the validation splits."""

from __future__ import annotations

from pathlib import Path

JGLUE_DIR = Path(__file__).resolve().parent / "jglue"
TRAIN_FILES = ("jcommonsenseqa-train.json", "jsts-train.json")
VALID_FILES = ("jcommonsenseqa-valid.json", "jnli-valid.json", "jsts-valid.json", "jsquad-valid.json")
