"""Token shards and `hataori data prepare`, checked against the tokenizer's own encoding of the
source text, across worker counts and id types, and across a SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hataori.cli import main as hataori_main
from hataori.corpus.sources import SourceConfig
from hataori.data.prepare import PrepareConfig, prepare
from hataori.data.shards import (FORMAT_VERSION, HEADER, MAGIC, MASKED_VERSION, Dataset, Shard, ShardError, ShardWriter,
                                 choose_dtype)
from hataori.errors import ConfigError, HataoriError, InputError
from hataori.outputs import MARKER
from hataori.tokenizer import proto as spm_proto
from hataori.tokenizer.model import Tokenizer

SLICE_BYTES = 1_500_000


@pytest.fixture(scope="module")
def corpus_slice(ja_corpus: Path, tmp_path_factory) -> Path:
    """The first ~1.5 MB of the corpus (whole lines), so that every prepare here takes about a second."""
    out = tmp_path_factory.mktemp("slice") / "slice.jsonl"
    kept, size = [], 0
    with open(ja_corpus / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            if size > SLICE_BYTES:
                break
            kept.append(line)
            size += len(line.encode("utf-8"))
    out.write_text("".join(kept), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tokenizer(ja_tokenizer: Path) -> Tokenizer:
    return Tokenizer(ja_tokenizer)


def run_prepare(corpus: Path, tokenizer: Tokenizer, out: Path, **settings) -> dict:
    cfg = PrepareConfig(sources=[SourceConfig(path=str(corpus))], tokenizer=str(tokenizer.path), output=str(out),
                        progress=False, **settings)
    return prepare(cfg)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".idx")}


def documents(folder: Path, split: str) -> list[list[int]]:
    data = Dataset(folder, split)
    return [data.doc(i).tolist() for i in range(len(data))]


# ----------------------------------------------------------------------------- the shard format


def write_shard(stem: Path, docs: list[list[int]], dtype="uint16", fingerprint="0123456789abcdef") -> None:
    with ShardWriter(stem, np.dtype(dtype), fingerprint) as writer:
        for i in range(0, len(docs), 3):  # several appends
            part = docs[i:i + 3]
            writer.add(np.concatenate([np.asarray(d) for d in part]), np.array([len(d) for d in part]))


def test_shard_round_trip_without_copies(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 65535, size=int(n)).tolist() + [2] for n in rng.integers(0, 50, size=20)]
    write_shard(tmp_path / "s", docs)
    shard = Shard(tmp_path / "s.bin", fingerprint="0123456789abcdef")
    assert (len(shard), shard.num_tokens, shard.dtype) == (20, sum(map(len, docs)), np.dtype("uint16"))
    assert [shard.doc(i).tolist() for i in range(20)] == docs
    assert shard[-1].tolist() == docs[-1]
    assert shard.lengths().tolist() == [len(d) for d in docs]
    # documents and slices are views of the mapped file, not copies
    assert isinstance(shard.tokens, np.memmap)
    assert np.shares_memory(shard.doc(5), shard.tokens)
    assert np.shares_memory(shard.tokens[10:30], shard.tokens)
    assert not shard.doc(0).flags.writeable
    # on-disk layout: header, then documents + 1 offsets; ids back to back
    raw = (tmp_path / "s.idx").read_bytes()
    magic, version, itemsize, fp, n_docs, n_tokens = HEADER.unpack(raw[:HEADER.size])
    assert (magic, version, itemsize, n_docs, n_tokens) == (MAGIC, FORMAT_VERSION, 2, 20, shard.num_tokens)
    assert fp.rstrip(b"\0") == b"0123456789abcdef"
    assert np.frombuffer(raw[HEADER.size:], "<i8").tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
    assert np.frombuffer((tmp_path / "s.bin").read_bytes(), "<u2").tolist() == sum(docs, [])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_shard_refuses_other_magic_version_fingerprint_and_damage(tmp_path):
    write_shard(tmp_path / "s", [[5, 6, 2], [7, 2]])
    idx = tmp_path / "s.idx"
    good = idx.read_bytes()
    with pytest.raises(ShardError, match=r"fingerprint 0123456789abcdef.*fingerprint ffffffffffffffff.*re-encode"):
        Shard(idx, fingerprint="ffffffffffffffff")

    idx.write_bytes(b"NOTASHRD" + good[8:])
    with pytest.raises(ShardError, match=r"not a hataori shard index \(magic .*expected, found b'NOTASHRD'"):
        Shard(idx)

    idx.write_bytes(good[:8] + struct.pack("<I", MASKED_VERSION + 1) + good[12:])
    with pytest.raises(ShardError, match=rf"format version {MASKED_VERSION + 1}, but this hataori reads versions "
                                         rf"{FORMAT_VERSION}, {MASKED_VERSION}; re-encode"):
        Shard(idx)
    idx.write_bytes(good[:8] + struct.pack("<I", MASKED_VERSION) + good[12:])  # a masked shard needs its mask
    with pytest.raises(ShardError, match=r"s.mask: missing, but its index promises a loss mask of 5 bytes"):
        Shard(idx)

    idx.write_bytes(good)
    (tmp_path / "s.bin").write_bytes((tmp_path / "s.bin").read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"index promises 5 tokens"):
        Shard(idx)
    with pytest.raises(InputError, match="no such shard index"):
        Shard(tmp_path / "missing")


def test_dtype_choice_and_overflow(tmp_path):
    assert choose_dtype(4000) == np.dtype("uint16")
    assert choose_dtype(65536) == np.dtype("uint16")
    assert choose_dtype(65537) == np.dtype("uint32")
    assert choose_dtype(4000, "uint32") == np.dtype("uint32")
    with pytest.raises(ShardError, match=r"vocabulary of 100000 tokens does not fit in uint16.*use dtype=uint32"):
        choose_dtype(100000, "uint16")
    with pytest.raises(ShardError, match="token id 70000 does not fit in uint16"):
        write_shard(tmp_path / "big", [[1, 70000, 2]])
    assert not list(tmp_path.iterdir())  # the failed writer left nothing behind
    write_shard(tmp_path / "wide", [[1, 70000, 2]], dtype="uint32")
    assert Shard(tmp_path / "wide").doc(0).tolist() == [1, 70000, 2]


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def prepared(corpus_slice, tokenizer, tmp_path_factory) -> Path:
    """The slice prepared with one worker, small shards and a 10% validation split."""
    out = tmp_path_factory.mktemp("prepared") / "ds"
    run_prepare(corpus_slice, tokenizer, out, workers=1, shard_tokens=20_000, val_fraction=0.1, batch_docs=16)
    return out


def test_prepare_matches_the_tokenizers_own_encoding(prepared, corpus_slice, tokenizer):
    texts = [json.loads(line)["text"] for line in corpus_slice.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    reference = [ids + [tokenizer.eos_id] for ids in tokenizer.encode(texts)]
    train, val = documents(prepared, "train"), documents(prepared, "val")
    # every source document is in exactly one split, in source order within each split
    i = j = 0
    for doc in reference:
        if i < len(train) and train[i] == doc:
            i += 1
        else:
            assert j < len(val) and val[j] == doc, "a shard document differs from the tokenizer's encoding"
            j += 1
    assert (i, j) == (len(train), len(val))
    assert 0.04 * len(reference) < len(val) < 0.2 * len(reference)
    assert tokenizer.decode(train[0][:-1]) == tokenizer.decode(reference[0][:-1])

    manifest = json.loads((prepared / "dataset.json").read_text())
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert manifest["dtype"] == "uint16" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert manifest["splits"]["train"]["tokens"] == sum(map(len, train))
    assert manifest["sources"][0]["documents"] == {"train": len(train), "val": len(val)}
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    for entry in shards:  # full shards stay within the limit unless one document alone exceeds it
        assert entry["tokens"] <= 20_000 or entry["documents"] == 1
    assert [p.name for p in prepared.iterdir() if p.name.startswith(".")] == [MARKER]  # no temporary file


def test_two_workers_write_identical_bytes(prepared, corpus_slice, tokenizer, tmp_path):
    run_prepare(corpus_slice, tokenizer, tmp_path / "w2", workers=2, shard_tokens=20_000, val_fraction=0.1,
                batch_docs=16)
    assert shard_bytes(tmp_path / "w2") == shard_bytes(prepared)


def test_uint32_shards_hold_the_same_ids(prepared, corpus_slice, tokenizer, tmp_path):
    run_prepare(corpus_slice, tokenizer, tmp_path / "u32", dtype="uint32", shard_tokens=20_000, val_fraction=0.1)
    assert Dataset(tmp_path / "u32").shards[0].dtype == np.dtype("uint32")
    for split in ("train", "val"):
        assert documents(tmp_path / "u32", split) == documents(prepared, split)


def test_val_docs_takes_exactly_that_many(corpus_slice, tokenizer, tmp_path):
    manifest = run_prepare(corpus_slice, tokenizer, tmp_path / "v", val_docs=7)
    assert manifest["splits"]["val"]["documents"] == 7


def test_resume_after_sigkill_matches_an_uninterrupted_run(prepared, corpus_slice, tokenizer, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["data", "prepare", "--input", str(corpus_slice), "--tokenizer", str(tokenizer.path), "--output", str(out),
            "--workers", "2", "shard_tokens=20000", "val_fraction=0.1", "batch_docs=1", "progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "hataori.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train-00002.idx").exists():
            assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "prepare wrote no shards within 60 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "dataset.json").exists(), "the run finished before the kill; nothing was resumed"

    assert hataori_main(args) == 0
    assert "resuming" in capsys.readouterr().err
    assert shard_bytes(out) == shard_bytes(prepared)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [MARKER]
    # a third run finds the dataset complete and leaves it alone
    assert hataori_main(args) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused(prepared, corpus_slice, tokenizer):
    with pytest.raises(HataoriError, match="already holds a dataset prepared from other inputs or settings"):
        run_prepare(corpus_slice, tokenizer, prepared, shard_tokens=30_000, val_fraction=0.1)


BAD_LINES = {
    "malformed JSON": (b'{"text": "\xe6\x97\xa5\xe6\x9c\xac"\n', "malformed JSON"),
    "invalid UTF-8": (b'{"text": "\x93\xfa\x96\x7b"}\n', "invalid UTF-8"),
    "missing field": (b'{"body": "x"}\n', "no 'text' field"),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_bad_input_names_file_and_line_or_is_skipped(name, corpus_slice, tokenizer, tmp_path):
    good = corpus_slice.read_bytes().splitlines(keepends=True)[:40]
    bad_line, message = BAD_LINES[name]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(b"".join(good[:30]) + bad_line + b"".join(good[30:]))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"bad\.jsonl:31: .*{message}"):
        run_prepare(corpus, tokenizer, out, batch_docs=4, shard_tokens=5_000)
    # complete shards may stay for a resume, but nothing half-written
    assert not (out / "dataset.json").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name] if out.exists() else True

    manifest = run_prepare(corpus, tokenizer, tmp_path / "skipping", skip_bad_lines=True, val_fraction=0)
    assert manifest["sources"][0]["skipped_lines"] == 1
    assert manifest["splits"]["train"]["documents"] == 40


def test_missing_and_empty_input(tokenizer, tmp_path):
    with pytest.raises(InputError, match="nothere.jsonl: no such file or folder"):
        run_prepare(tmp_path / "nothere.jsonl", tokenizer, tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(HataoriError, match="no documents went to the train split"):
        run_prepare(empty, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line_config_errors(tokenizer, corpus_slice, tmp_path, capsys):
    base = ["data", "prepare", "--input", f"{corpus_slice}:2", "--tokenizer", str(tokenizer.path),
            "--output", str(tmp_path / "out")]
    assert hataori_main([*base, "val_fractoin=0.1"]) == 2
    assert "did you mean 'val_fraction'" in capsys.readouterr().err
    assert hataori_main([*base, "val_fraction=1.5"]) == 2
    assert "val_fraction: must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no input"):
        PrepareConfig(tokenizer="t", output="o")
    assert hataori_main([*base, "val_fraction=0", "progress=false"]) == 0
    report = capsys.readouterr().out
    assert "MB/s" in report and "tokens/s" in report
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert manifest["sources"][0]["weight"] == 2.0
    assert hataori_main(["data", "inspect", str(tmp_path / "out")]) == 0
    assert f"tokenizer {tokenizer.fingerprint}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- checks when shards are opened


def copy_of(prepared: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(prepared, copy)
    return copy


def test_shuffled_offsets_are_refused_naming_shard_and_document(prepared, tmp_path, capsys):
    copy = copy_of(prepared, tmp_path)
    idx = copy / "train-00002.idx"
    raw = idx.read_bytes()
    offsets = np.frombuffer(raw[HEADER.size:], "<i8").copy()
    offsets[1:-1] = np.random.default_rng(0).permutation(offsets[1:-1])  # first and last stay intact
    idx.write_bytes(raw[:HEADER.size] + offsets.tobytes())
    first_bad = next(i for i in range(len(offsets) - 1) if offsets[i + 1] <= offsets[i])
    with pytest.raises(ShardError, match=rf"{re.escape(str(idx))}: document {first_bad} has offsets"):
        Dataset(copy)
    assert hataori_main(["data", "inspect", str(copy)]) == 2
    assert f"hataori: error: {idx}: document {first_bad} has offsets" in capsys.readouterr().err


def test_ids_outside_the_vocabulary_are_refused_naming_shard_and_document(prepared, tokenizer, tmp_path, capsys):
    copy = copy_of(prepared, tmp_path)
    manifest = json.loads((copy / "dataset.json").read_text())
    entries = manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]
    for entry in entries:  # the recorded largest ids are the files' own
        assert entry["max_id"] == max(np.fromfile(copy / f"{entry['name']}.bin", "<u2").tolist())

    # A damaged .bin of the right size: `data inspect` reads every id.
    bin_path = copy / "train-00002.bin"
    ids = np.fromfile(bin_path, "<u2")
    offsets = np.fromfile(copy / "train-00002.idx", "<i8", offset=HEADER.size)
    ids[offsets[3] + 2] = tokenizer.vocab_size + 5
    ids.tofile(bin_path)
    message = f"{bin_path}: document 3 holds token id {tokenizer.vocab_size + 5}, but the tokenizer has " \
              f"{tokenizer.vocab_size} pieces"
    with pytest.raises(ShardError, match=re.escape(message)):
        Dataset(copy, verify=True)
    assert hataori_main(["data", "inspect", str(copy)]) == 2
    assert message in capsys.readouterr().err
    shutil.copy(prepared / bin_path.name, bin_path)

    # A manifest whose vocabulary is smaller than the ids, with the largest ids recorded or (an older
    # manifest) not: opening the dataset, as the loader does, names the first such document.
    small = 1000
    expected = next((entry["name"], i) for entry in manifest["splits"]["train"]["shards"]
                    for i, doc in enumerate(Shard(prepared / entry["name"])) if max(doc.tolist()) >= small)
    manifest["tokenizer"]["vocab_size"] = small
    for recorded in (True, False):
        if not recorded:
            for entry in entries:
                del entry["max_id"]
        (copy / "dataset.json").write_text(json.dumps(manifest))
        with pytest.raises(ShardError, match=rf"{expected[0]}\.bin: document {expected[1]} holds token id \d+, but "
                                             rf"the tokenizer has {small} pieces"):
            Dataset(copy)


def test_inspect_refuses_another_tokenizer(prepared, tokenizer, tmp_path, capsys):
    model = spm_proto.read(tokenizer.path)
    model.pieces[-1].score -= 1.0  # another model of the same size
    (tmp_path / "other.model").write_bytes(model.SerializeToString())
    other = Tokenizer(tmp_path / "other.model")
    for target in (prepared, prepared / "train-00000.bin"):
        assert hataori_main(["data", "inspect", str(target), "--tokenizer", str(other.path)]) == 2
        err = capsys.readouterr().err
        assert tokenizer.fingerprint in err and other.fingerprint in err and "re-encode" in err
    assert hataori_main(["data", "inspect", str(prepared), "--tokenizer", str(tokenizer.path), "--show", "1"]) == 0
    assert tokenizer.decode(documents(prepared, "train")[0][:-1]) in capsys.readouterr().out


# ----------------------------------------------------------------------------- existing outputs, full disks


def test_prepare_refuses_another_dataset_or_other_files_unless_replace(prepared, corpus_slice, tokenizer, tmp_path,
                                                                       capsys):
    out = tmp_path / "ds"
    args = ["data", "prepare", "--input", str(corpus_slice), "--tokenizer", str(tokenizer.path), "--output", str(out),
            "val_fraction=0.1", "progress=false"]
    assert hataori_main([*args, "shard_tokens=30000"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert hataori_main([*args, "shard_tokens=20000"]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a dataset prepared from other inputs" in err and "pass --replace" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hataori_main([*args, "shard_tokens=20000", "--replace"]) == 0
    assert shard_bytes(out) == shard_bytes(prepared)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the old dataset and the staging folder are gone

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    for replace in ([], ["--replace"]):
        assert hataori_main([*args[:-3], str(notes), "progress=false", *replace]) == 2
        err = capsys.readouterr().err
        assert f"{notes}: holds files that no hataori command wrote (keep.txt), not a dataset folder" in err
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]

    # A dataset whose dataset.json is damaged: named, and replaced with --replace (prepare repairs its own folder).
    (out / "dataset.json").write_text("{not json", encoding="utf-8")
    assert hataori_main([*args, "shard_tokens=20000"]) == 2
    assert f"{out} already holds a dataset whose dataset.json is damaged (" in capsys.readouterr().err
    assert hataori_main([*args, "shard_tokens=20000", "--replace"]) == 0
    assert shard_bytes(out) == shard_bytes(prepared)
    # The corpus's own folder is never the output.
    assert hataori_main([*args[:-3], str(corpus_slice.parent), "progress=false", "--replace"]) == 2
    assert f"holds {corpus_slice}, an input of this command" in capsys.readouterr().err


def test_disk_full_is_an_error_naming_the_output_and_leaves_nothing(prepared, corpus_slice, tokenizer, tmp_path,
                                                                   capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    manifest = json.loads((prepared / "dataset.json").read_text())
    needed = 2 * sum(manifest["splits"][split]["tokens"] for split in ("train", "val"))
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={needed // 2 // 4096 * 4096}", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    try:
        out = disk / "ds"
        assert hataori_main(["data", "prepare", "--input", str(corpus_slice), "--tokenizer", str(tokenizer.path),
                             "--output", str(out), "shard_tokens=20000", "val_fraction=0.1", "progress=false"]) == 2
        assert f"hataori: error: {out}: the disk is full" in capsys.readouterr().err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
