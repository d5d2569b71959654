"""``hataori corpus jglue-sft OUT``: an instruction set and preference pairs from JGLUE's training splits, offline.

    hataori corpus jglue-sft OUT [--replace]

From the JGLUE v1.3 files hataori ships (:mod:`hataori.corpus.jglue_files`), in the style of llm-jp's
jaster (each task an instruction, its input, and the short answer the task scores):

``OUT/sft.jsonl``
    Conversations (``messages``: a user turn with the instruction and the input, an assistant turn with
    the answer), one per example of JCommonsenseQA train (the answer: the right choice's words) and
    JSTS train (the answer: the similarity, one decimal), with ``source`` and ``id``. Read by
    ``hataori data prepare --chat-template``.
``OUT/preference.jsonl``
    ``prompt``, ``chosen`` (the right choice) and ``rejected`` (one of the four wrong ones, drawn from a
    generator seeded by the question's id) for every JCommonsenseQA train question: TRL's field names.
``OUT/manifest.json``, ``OUT/README.md``, ``OUT/LICENSE``
    What was read and kept, the decontamination counts, the files' sizes and SHA-256; the attribution
    and the license: the files derive from JGLUE and are CC BY-SA 4.0 like it.

Decontamination: every record is checked against JGLUE's validation splits shipped beside the training
ones (JCommonsenseQA, JNLI, JSTS, JSQuAD) by 13-character n-grams (:mod:`hataori.corpus.decontaminate`);
a record sharing one is dropped and counted, per validation file. (JSTS and JNLI draw their sentences
from the same image captions, so JSTS train sentences recur in JNLI valid.) JGLUE's test splits are not
public, so nothing is checked against them.

A rerun with an up-to-date OUT does nothing; OUT is held under :mod:`hataori.outputs`' contract (another
corpus, or other files, are replaced only with ``--replace``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

from hataori.corpus.decontaminate import DEFAULT_N, EvalIndex, find_overlaps, read_records
from hataori.corpus.jglue_files import JGLUE_DIR, VALID_FILES
from hataori.corpus.output import MANIFEST_FILE, sha256_file
from hataori.errors import InputError
from hataori.fsutil import atomic_path, atomic_write_text
from hataori.outputs import Output, claim

FORMAT = 1
SFT_FILE, PREFERENCE_FILE = "sft.jsonl", "preference.jsonl"
FILES = (SFT_FILE, PREFERENCE_FILE, "README.md", "LICENSE")

JCQA_INSTRUCTION = ("次の質問に、選択肢の中から最も適切なものを一つ選んで答えてください。"
                    "答えには選んだ選択肢の語句だけを書いてください。")
JSTS_INSTRUCTION = ("次の二つの文の意味がどのくらい近いかを、0.0（まったく関係がない）から5.0（同じ意味）までの"
                    "数値で答えてください。答えには小数点以下一桁の数値だけを書いてください。")


def jcqa_prompt(record: dict) -> str:
    choices = "、".join(record[f"choice{i}"] for i in range(5))
    return f"{JCQA_INSTRUCTION}\n\n質問：{record['question']}\n選択肢：{choices}"


def jsts_prompt(record: dict) -> str:
    return f"{JSTS_INSTRUCTION}\n\n文1：{record['sentence1']}\n文2：{record['sentence2']}"


def _read(name: str, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    path = JGLUE_DIR / name
    out = []
    for line, record in read_records(path):
        missing = [f for f in fields if f not in record]
        if missing:
            raise InputError(path, f"no {', '.join(missing)} (a JGLUE v1.3 {name} record has them)", line=line)
        out.append((line, record))
    return out


def examples() -> tuple[list[dict], list[dict]]:
    """The conversations and the preference pairs, before decontamination."""
    sft, pairs = [], []
    jcqa_fields = ("q_id", "question", "label", *(f"choice{i}" for i in range(5)))
    for _, record in _read("jcommonsenseqa-train.json", jcqa_fields):
        prompt, answer = jcqa_prompt(record), record[f"choice{record['label']}"]
        ident = f"jcommonsenseqa-train/{record['q_id']}"
        sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                    "source": "jcommonsenseqa-train", "id": ident})
        wrong = [record[f"choice{i}"] for i in range(5) if i != record["label"]]
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": random.Random(ident).choice(wrong),
                      "source": "jcommonsenseqa-train", "id": ident})
    for _, record in _read("jsts-train.json", ("sentence_pair_id", "sentence1", "sentence2", "label")):
        sft.append({"messages": [{"role": "user", "content": jsts_prompt(record)},
                                 {"role": "assistant", "content": f"{float(record['label']):.1f}"}],
                    "source": "jsts-train", "id": f"jsts-train/{record['sentence_pair_id']}"})
    return sft, pairs


def decontaminate(records: list[dict], index: EvalIndex) -> tuple[list[dict], dict[str, int], list[str]]:
    """The records sharing no n-gram with the index; how many were dropped per validation file; examples.
    Only the input is compared (the instruction is the same in every record, and is no validation text)."""
    def text(record: dict):
        if "messages" in record:
            return [m["content"].split("\n\n", 1)[-1] if m["role"] == "user" else m["content"]
                    for m in record["messages"]]
        return [record["prompt"].split("\n\n", 1)[-1], record["chosen"], record["rejected"]]

    hits = find_overlaps(((r["id"], text(r)) for r in records), index)
    dropped = {name: 0 for name in index.files}
    for file, _ in hits.values():
        dropped[index.files[file]] += 1
    examples = [f"{ident}: {gram!r} in {index.files[file]}" for ident, (file, gram) in list(hits.items())[:5]]
    return [r for r in records if r["id"] not in hits], dropped, examples


def build(out: Path, replace: bool = False) -> tuple[dict, bool]:
    """Build (or find up to date) the instruction set in ``out``; (manifest, whether it was built)."""
    with claim(out, "corpus", option="OUT") as held:
        return _build(out, replace=replace, held=held)


def _inputs() -> dict[str, str]:
    names = ("jcommonsenseqa-train.json", "jsts-train.json", *VALID_FILES, "LICENSE")
    return {name: sha256_file(JGLUE_DIR / name) for name in names}


def _up_to_date(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        same = (manifest["format"] == FORMAT and manifest["inputs"] == _inputs()
                and all(sha256_file(out / name) == manifest["files"][name]["sha256"] for name in FILES))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if same else None


def _build(out: Path, *, replace: bool, held: Output) -> tuple[dict, bool]:
    started = time.monotonic()
    manifest = _up_to_date(out)
    if manifest is not None:
        return manifest, False
    held.check_replace(replace)
    sft, pairs = examples()
    index = EvalIndex.build([JGLUE_DIR / name for name in VALID_FILES], DEFAULT_N)
    index.files = list(VALID_FILES)  # named in the manifest by file name
    kept_sft, dropped_sft, examples_sft = decontaminate(sft, index)
    kept_pairs, dropped_pairs, _ = decontaminate(pairs, index)
    with held.folder() as tmp:
        for name, records in ((SFT_FILE, kept_sft), (PREFERENCE_FILE, kept_pairs)):
            with atomic_path(tmp / name) as path, open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        shutil.copyfile(JGLUE_DIR / "LICENSE", tmp / "LICENSE")
        atomic_write_text(tmp / "README.md", readme(kept_sft, kept_pairs, dropped_sft))
        by_source = {}
        for record in kept_sft:
            by_source[record["source"]] = by_source.get(record["source"], 0) + 1
        manifest = {
            "format": FORMAT, "inputs": _inputs(),
            "sft": {"records": len(kept_sft), "by_source": by_source, "read": len(sft),
                    "dropped_overlapping": dropped_sft, "examples": examples_sft},
            "preference": {"records": len(kept_pairs), "read": len(pairs), "dropped_overlapping": dropped_pairs},
            "decontamination": {"n": DEFAULT_N, "against": list(VALID_FILES), "test_splits": "not public; not checked"},
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                      for name in FILES},
            "build_seconds": round(time.monotonic() - started, 2),
        }
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest, True


def readme(sft: list[dict], pairs: list[dict], dropped: dict[str, int]) -> str:
    digest = hashlib.sha256("".join(json.dumps(r, ensure_ascii=False) for r in sft).encode()).hexdigest()[:16]
    return "\n".join([
        "# JGLUE instruction set (derived from JGLUE v1.3)", "",
        f"`{SFT_FILE}`: {len(sft):,} conversations from the training splits of JCommonsenseQA and JSTS; "
        f"`{PREFERENCE_FILE}`: {len(pairs):,} preference pairs from JCommonsenseQA train (the right choice "
        "chosen, a wrong one rejected). Written by `hataori corpus jglue-sft` (records digest "
        f"{digest}). Records sharing a 13-character n-gram with JGLUE's validation splits were dropped: "
        + ", ".join(f"{count} against {name}" for name, count in dropped.items()) + ".", "",
        "Derived from JGLUE v1.3 (yahoojapan/JGLUE on GitHub, tag v1.3.0) by Kurihara, Kawahara and Shibata, "
        "\"JGLUE: Japanese General Language Understanding Evaluation\", LREC 2022, pages 2957-2966. "
        "Licensed like its source under Creative Commons Attribution-ShareAlike 4.0 International (LICENSE "
        "beside this file): whatever copies or derives from these files keeps this attribution and license.", ""])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT", help="folder for sft.jsonl, preference.jsonl and the manifest")
    parser.add_argument("--replace", action="store_true",
                        help="replace an OUT that holds another corpus or other files")


def main(args: argparse.Namespace) -> int:
    manifest, built = build(args.out, replace=args.replace)
    sft, pairs = manifest["sft"], manifest["preference"]
    dropped = ", ".join(f"{count} overlapping {name}" for name, count in sft["dropped_overlapping"].items())
    print(f"{args.out}: {'built' if built else 'up to date'}; {sft['records']:,} conversations "
          f"({', '.join(f'{n:,} {s}' for s, n in sft['by_source'].items())}; dropped {dropped}), "
          f"{pairs['records']:,} preference pairs (dropped {sum(pairs['dropped_overlapping'].values())})")
    return 0
