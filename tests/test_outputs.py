"""The output contract (hataori/outputs.py): one writer at a time, nothing left by a killed writer, and
``--replace`` only over an earlier output of the same kind, never over an input, a run folder or a user's files.
Each command's own cases are in its test module (export, tokenizer train and extend, data prepare, eval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hataori.errors import InputError
from hataori.outputs import MARKER, OutputBusy, claim

HOLD = """
import sys, time
from hataori.outputs import claim
out = claim(sys.argv[1], "tokenizer")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    target = tmp_path / "tok"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusy) as busy:
            claim(target, "tokenizer")
        assert str(busy.value).startswith(f"{target} is being written by PID {holder.pid} on ")
        assert f"kill {holder.pid}" in str(busy.value)
    finally:
        holder.kill()
        holder.wait()
    with claim(target, "tokenizer") as out:  # its holder is gone: taken over
        assert out.lock.owned
    assert not (tmp_path / ".tok.lock").exists()


def test_what_a_killed_writer_left_is_removed(tmp_path):
    (tmp_path / ".tok.tmp-12345-abcdef01").mkdir()
    (tmp_path / ".tok.tmp-12345-abcdef01" / "tokenizer.model").write_bytes(b"half")
    (tmp_path / ".other.tmp-12345-abcdef01").mkdir()  # another output's: not ours to remove
    with claim(tmp_path / "tok", "tokenizer") as out:
        with out.folder() as tmp:
            (tmp / "tokenizer.model").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-12345-abcdef01", "tok"]
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [MARKER, "tokenizer.model"]
    marker = json.loads((tmp_path / "tok" / MARKER).read_text())
    assert marker["kind"] == "tokenizer" and marker["hataori"]


def test_replace_only_an_earlier_output_of_the_same_kind(tmp_path):
    def write(path, kind, name="a.txt", text="new"):
        with claim(path, kind) as out:
            out.check_replace(replace=True)
            with out.folder() as tmp:
                (tmp / name).write_text(text)

    write(tmp_path / "tok", "tokenizer", text="first")
    with claim(tmp_path / "tok", "tokenizer") as out:
        with pytest.raises(InputError, match="holds a tokenizer folder .*; pass --replace to replace it"):
            out.check_replace(replace=False)
    write(tmp_path / "tok", "tokenizer", text="second")
    assert (tmp_path / "tok" / "a.txt").read_text() == "second"
    # Another kind's output, a run folder, a model, a user's files: refused, named, and left as they were.
    with pytest.raises(InputError, match=r"holds a tokenizer folder \(hataori tokenizer train or extend\), not a "
                                         r"dataset folder \(hataori data prepare\); --replace replaces only"):
        write(tmp_path / "tok", "dataset")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(InputError, match=r"holds a run folder \(config.yaml, checkpoints/\), not a tokenizer"):
        write(run, "tokenizer")
    model = tmp_path / "llama"
    model.mkdir()
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors", "README.md"):
        (model / name).write_text("{}")
    with pytest.raises(InputError, match="holds a model folder that hataori export hf did not write"):
        write(model, "hf-model")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"holds files that no hataori command wrote \(notes.txt\)"):
        write(user, "peft-adapter")
    assert (user / "notes.txt").read_text() == "keep me" and (run / "config.yaml").is_file()
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "config.json", "model-00001-of-00001.safetensors",
                                                       "model.safetensors.index.json"]


def test_a_tokenizer_written_before_the_marker_is_recognised(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("tokenizer.model", "tokenizer.vocab", "config.yaml", "summary.json"):
        (old / name).write_text("x")
    with claim(old, "tokenizer") as out:
        out.check_replace(replace=True)
    (old / "notes.txt").write_text("mine")  # no longer only a tokenizer's files
    with claim(old, "tokenizer") as out, pytest.raises(InputError, match="files that no hataori command wrote"):
        out.check_replace(replace=True)


def test_an_input_or_a_folder_holding_one_is_never_the_output(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.model").write_bytes(b"base")
    with pytest.raises(InputError, match=rf"^{base}: holds {base / 'tokenizer.model'}, an input of this command"):
        claim(base, "tokenizer", inputs=[base / "tokenizer.model"])
    with pytest.raises(InputError, match=rf"^{base}: is {base}, an input of this command"):
        claim(base, "tokenizer", inputs=[base])
    with claim(base / "extended", "tokenizer", inputs=[base / "tokenizer.model"]) as out:  # beside it is fine
        out.check_replace(replace=False)
    assert sorted(p.name for p in base.iterdir()) == ["tokenizer.model"]  # the claim made and removed nothing


def test_a_file_output_replaces_only_its_own_kind(tmp_path):
    results = tmp_path / "results.json"
    with claim(results, "eval-results", is_dir=False) as out:
        out.check_replace(replace=False)
        with out.file() as tmp:
            tmp.write_text(json.dumps({"task": "jnli", "scores": {}, "model": {}}))
    with claim(results, "eval-results", is_dir=False) as out:
        with pytest.raises(InputError, match="pass --replace"):
            out.check_replace(replace=False)
        out.check_replace(replace=True)
    notes = tmp_path / "notes.json"
    notes.write_text("[1, 2]")
    with claim(notes, "eval-results", is_dir=False) as out:
        with pytest.raises(InputError, match="holds a file that no hataori command wrote, not an eval results file"):
            out.check_replace(replace=True)
    with claim(tmp_path, "eval-results", is_dir=False) as out:
        with pytest.raises(InputError, match="is a folder; --output names a file to write"):
            out.check_replace(replace=True)


def test_a_failed_write_leaves_no_folder_it_made(tmp_path):
    target = tmp_path / "a" / "b" / "tok"
    with pytest.raises(RuntimeError):
        with claim(target, "tokenizer") as out:
            with out.folder() as tmp:
                (tmp / "tokenizer.model").write_bytes(b"half")
                raise RuntimeError("killed by the test")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_the_lock_of_a_writer_killed_with_sigkill_is_taken_over(tmp_path, capsys):
    target = tmp_path / "tok"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, 9)
    holder.wait()
    time.sleep(0.1)
    with claim(target, "tokenizer") as out:
        assert out.lock.owned
    assert f"held by PID {holder.pid} on this host, which is no longer running; taking the output over" in \
        capsys.readouterr().err


def test_the_current_folder_as_the_output_is_named_not_a_traceback(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    with claim(".", "tokenizer") as out, pytest.raises(InputError, match=rf"^{tmp_path}: holds files that no "):
        out.check_replace(replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", ["export hf", "tokenizer extend", "eval --output"])
def test_a_full_disk_is_an_error_naming_the_output_and_leaves_nothing(command, jcqa_tokenizer, ja_tokenizer,
                                                                     tmp_path, capsys):
    """Each command writes onto a 64 KiB tmpfs (the export, the extended tokenizer) or a full one (the eval
    results): exit 2 with one line naming the output, and the disk holds nothing the command wrote."""
    from helpers import fill, make_run, small_disk

    from hataori.cli import main as hataori_main

    run, _ = make_run(tmp_path / "run", jcqa_tokenizer)
    with small_disk(tmp_path / "disk", "64k") as disk:
        out, argv = {
            "export hf": (disk / "hf", ["export", "hf", str(run), "--output", str(disk / "hf"), "--dtype", "fp32"]),
            "tokenizer extend": (disk / "tok", ["tokenizer", "extend", str(jcqa_tokenizer), "--add", str(ja_tokenizer),
                                                "--output", str(disk / "tok")]),
            "eval --output": (disk / "scores.json", ["eval", str(run), "--task", "jcommonsenseqa", "--limit", "2",
                                                     "--device", "cpu", "--output", str(disk / "scores.json")]),
        }[command]
        if command == "eval --output":
            fill(disk)
        capsys.readouterr()
        assert hataori_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hataori: error: {out}: the disk is full (No space left on device); nothing "
                              "half-written was kept"), err
        assert sorted(p.name for p in disk.iterdir()) == (["filler"] if command == "eval --output" else [])
