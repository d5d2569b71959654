"""Reading corpora: every format and compression yields the same documents; bad lines are named."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from hataori.corpus.sources import ReadStats, SourceConfig, expand, in_validation, iter_documents, split_key
from hataori.errors import InputError
from hataori.sourcespec import parse_source


@pytest.fixture(scope="module")
def docs(ja_corpus: Path) -> list[str]:
    with open(ja_corpus / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(40), f)]


def jsonl_bytes(docs: list[str], key: str = "text") -> bytes:
    return "".join(json.dumps({key: d, "n": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def read(path: Path, **source) -> list[str]:
    return list(iter_documents(path, SourceConfig(path=str(path), **source)))


def test_jsonl_plain_gz_and_zst_read_the_same(docs, tmp_path):
    raw = jsonl_bytes(docs)
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst"):
        assert read(tmp_path / name) == docs, name


def test_plain_text_document_units(docs, tmp_path):
    # Paragraphs of the corpus hold no blank lines; documents are paragraphs joined by one.
    paragraphs = [p for d in docs for p in d.split("\n\n")]
    text = "\n\n".join(paragraphs) + "\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    assert read(tmp_path / "a.txt") == paragraphs
    assert read(tmp_path / "a.txt.zst") == paragraphs
    lines = [line for p in paragraphs for line in p.split("\n") if line.strip()]
    assert read(tmp_path / "a.txt", plain_docs="line") == lines
    assert read(tmp_path / "a.txt", plain_docs="file") == [text.strip("\n")]


def test_text_key_and_stats(docs, tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(jsonl_bytes(docs, key="body"))
    stats = ReadStats()
    got = list(iter_documents(path, SourceConfig(path=str(path), text_key="body"), stats=stats))
    assert got == docs
    assert (stats.documents, stats.chars, stats.bytes) == (len(docs), sum(map(len, docs)), path.stat().st_size)


def test_expand_files_globs_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("sub/b.jsonl.zst", "a.jsonl", "c.txt.gz", "notes.md", "sub/d.ndjson"):
        (tmp_path / name).write_bytes(b"")
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(expand(SourceConfig(path=str(tmp_path)))) == ["a.jsonl", "c.txt.gz", "sub/b.jsonl.zst", "sub/d.ndjson"]
    assert names(expand(SourceConfig(path=str(tmp_path / "**" / "*.jsonl*")))) == ["a.jsonl", "sub/b.jsonl.zst"]
    assert names(expand(SourceConfig(path=str(tmp_path / "a.jsonl")))) == ["a.jsonl"]
    with pytest.raises(InputError, match="no files match"):
        expand(SourceConfig(path=str(tmp_path / "*.parquet")))
    with pytest.raises(InputError, match="no such file or folder"):
        expand(SourceConfig(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no corpus files"):
        expand(SourceConfig(path=str(tmp_path / "empty")))


@pytest.mark.parametrize("line, needle", [
    (b'{"text": "\xe3\x81\x82"', "malformed JSON"),
    (b'{"body": "x"}', "no 'text' field"),
    (b'["a"]', "expected a JSON object"),
    (b'{"text": 3}', "is int, not a string"),
    (b'{"text": "\xe3\x81"}', "invalid UTF-8"),
])
def test_bad_line_named_in_compressed_file_or_skipped(docs, tmp_path, line, needle):
    raw = jsonl_bytes(docs[:5]) + line + b"\n" + jsonl_bytes(docs[5:8])
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    with pytest.raises(InputError) as err:
        read(path)
    assert str(err.value).startswith(f"{path}:6: ") and needle in str(err.value)
    stats = ReadStats()
    assert list(iter_documents(path, SourceConfig(path=str(path)), skip_bad=True, stats=stats)) == docs[:8]
    assert stats.skipped == 1 and stats.skipped_examples[0].startswith(f"{path}:6:")


@pytest.mark.parametrize("suffix, compress", [(".zst", zstandard.ZstdCompressor().compress), (".gz", gzip.compress)])
def test_truncated_compressed_file_is_named_whatever_skip_bad_lines(docs, tmp_path, suffix, compress):
    whole = compress(jsonl_bytes(docs))
    path = tmp_path / f"cut.jsonl{suffix}"
    for end in (len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:end])
        for skip in (False, True):
            stats = ReadStats()
            with pytest.raises(InputError) as err:
                list(iter_documents(path, SourceConfig(path=str(path)), skip_bad=skip, stats=stats))
            assert str(err.value).startswith(f"{path}: truncated or corrupt compressed file"), str(err.value)
            assert stats.skipped == 0


def test_zst_file_of_several_frames_reads_whole(docs, tmp_path):
    raw = jsonl_bytes(docs)
    half = raw.index(b"\n", len(raw) // 2) + 1
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(part) for part in (raw[:half], raw[half:])))
    assert read(path) == docs


def test_parse_source():
    assert parse_source("a.jsonl") == {"path": "a.jsonl"}
    assert parse_source("a.jsonl:2.5") == {"path": "a.jsonl", "weight": 2.5}
    assert parse_source("C:/data/a.jsonl") == {"path": "C:/data/a.jsonl"}


def test_validation_split_is_a_stable_fraction(docs):
    texts = [f"{i}:{d[:50]}" for i, d in enumerate(docs * 50)]
    chosen = [t for t in texts if in_validation(t, 0.2, seed=3)]
    assert 0.17 < len(chosen) / len(texts) < 0.23
    assert chosen == [t for t in texts if in_validation(t, 0.2, seed=3)]
    assert chosen != [t for t in texts if in_validation(t, 0.2, seed=4)]
    assert all(split_key(t, 3) < int(0.2 * 2**64) for t in chosen)
