"""Shared fixtures: the real Japanese corpus and a tokenizer trained on it.

The corpora (Debian's Japanese documentation, news sentences, Python's docstrings) are built once per
machine into a cache folder (``HATAORI_TEST_CACHE``, default ``~/.cache/hataori-tests``) by
scripts/test_data.sh, with the same commands users run; the tests only read them and never download. The
tokenizers are trained once per test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hataori.cli import main as hataori_main

REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    path = Path(os.environ.get("HATAORI_TEST_CACHE", Path.home() / ".cache" / "hataori-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def built_corpus(name: str) -> Path:
    """The cache's folder of corpus ``name`` as scripts/test_data.sh built it (corpus.jsonl and, written
    last, manifest.json); the test fails, naming the script, where it is not built."""
    out = cache_dir() / name
    if not (out / "manifest.json").is_file() or not (out / "corpus.jsonl").is_file():
        pytest.fail(f"the test corpus {name} is not built in {out}: run 'bash scripts/test_data.sh' (scripts/test.sh "
                    "does; it downloads Debian packages and one PyPI sdist the first time), then the tests again",
                    pytrace=False)
    return out


@pytest.fixture(scope="session")
def ja_corpus() -> Path:
    """Folder of the Debian Japanese corpus: corpus.jsonl (text, source, path), manifest.json and debs/."""
    return built_corpus("debian-ja")


@pytest.fixture(scope="session")
def ja_other_text() -> Path:
    """JSONL of news-style Japanese sentences (not documentation), for out-of-domain evaluation."""
    return built_corpus("ja-news") / "corpus.jsonl"


@pytest.fixture(scope="session")
def en_corpus() -> Path:
    """Folder of English documentation text (the docstrings of Python's standard library)."""
    return built_corpus("python-docs")


@pytest.fixture(scope="session")
def ja_tokenizer(ja_corpus: Path, tmp_path_factory) -> Path:
    """Folder of a small unigram tokenizer (tokenizer.model, config.yaml, summary.json) trained on a
    sample of the corpus: 4,000 pieces, so only kana and symbols are required characters."""
    out = tmp_path_factory.mktemp("tokenizer")
    assert hataori_main(["tokenizer", "train", "--input", str(ja_corpus / "corpus.jsonl"),
                         "--output", str(out), "vocab_size=4000", "max_input_chars=1000000",
                         "required_chars=kana", "progress=false"]) == 0
    return out


@pytest.fixture(scope="session")
def ja_bpe_tokenizer(ja_corpus, tmp_path_factory) -> Path:
    """A 4,000-piece Japanese BPE tokenizer from `hataori tokenizer train` (the kind that extends a BPE base)."""
    out = tmp_path_factory.mktemp("bpe") / "tok"
    assert hataori_main(["tokenizer", "train", str(REPO / "configs/tokenizer/ja-bpe-32k.yaml"), "--input",
                         str(ja_corpus / "corpus.jsonl"), "--output", str(out), "vocab_size=4000",
                         "max_input_chars=1000000", "required_chars=kana", "progress=false"]) == 0
    return out


@pytest.fixture(scope="session")
def en_bpe_tokenizer(en_corpus, tmp_path_factory) -> Path:
    """A 2,000-piece English BPE from `hataori tokenizer train` with Llama's settings (dummy prefix,
    byte fallback; configs/tokenizer/en-bpe-llama-style.yaml), the recipe's base tokenizer."""
    out = tmp_path_factory.mktemp("en-bpe") / "tok"
    assert hataori_main(["tokenizer", "train", str(REPO / "configs/tokenizer/en-bpe-llama-style.yaml"), "--input",
                         str(en_corpus / "corpus.jsonl"), "--output", str(out), "vocab_size=2000",
                         "max_input_chars=600000", "progress=false"]) == 0
    return out


@pytest.fixture(scope="session")
def llama_style_tokenizer(en_corpus, tmp_path_factory) -> Path:
    """A SentencePiece BPE with Llama's settings (dummy prefix, byte fallback, digits split, identity
    normalization, no user-defined pieces), trained on English by SentencePiece itself."""
    import json

    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("llama") / "tokenizer"
    with open(en_corpus / "corpus.jsonl", encoding="utf-8") as f:
        lines = [line for doc in f for line in json.loads(doc)["text"].split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=3000,
                                   model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   allow_whitespace_only_pieces=True, character_coverage=0.9999, pad_id=-1,
                                   minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def jcqa_tokenizer(tmp_path_factory) -> Path:
    """A 2,000-piece unigram tokenizer of the bundled JCommonsenseQA train questions and choices (small and
    quick to train, for tests that need a real Japanese tokenizer but no corpus)."""
    import json

    from hataori.eval.tasks import JGLUE, TASKS, read_examples

    folder = tmp_path_factory.mktemp("jcqa-tokenizer")
    corpus = folder / "jcqa.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for example in read_examples(TASKS["jcommonsenseqa"], JGLUE / "jcommonsenseqa-train.json"):
            f.write(json.dumps({"text": "\n".join(example.fields.values())}, ensure_ascii=False) + "\n")
    out = folder / "tok"
    assert hataori_main(["tokenizer", "train", "--input", str(corpus), "--output", str(out), "vocab_size=2000",
                         "required_chars=kana", "progress=false"]) == 0
    return out


@pytest.fixture(scope="session")
def chat_tokenizer(jcqa_tokenizer, tmp_path_factory) -> Path:
    """The JCommonsenseQA tokenizer with the preset's special pieces added by `hataori tokenizer extend`."""
    out = tmp_path_factory.mktemp("chat") / "tok"
    assert hataori_main(["tokenizer", "extend", str(jcqa_tokenizer), "--pieces", "<|im_start|>,<|im_end|>",
                         "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def ja_shards(ja_corpus: Path, ja_tokenizer: Path, tmp_path_factory) -> Path:
    """A prepared dataset (dataset.json, train and val shards) of every 12th corpus document (about
    480), encoded with ``ja_tokenizer``; 12 documents in the validation split."""
    import itertools

    folder = tmp_path_factory.mktemp("shards")
    sample = folder / "sample.jsonl"
    with open(ja_corpus / "corpus.jsonl", encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, 0, None, 12))
    out = folder / "debian-ja"
    assert hataori_main(["data", "prepare", "--input", str(sample), "--tokenizer", str(ja_tokenizer),
                         "--output", str(out), "val_docs=12", "progress=false"]) == 0
    return out


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """A real Slurm cluster on this machine: munged, slurmctld and two fake nodes of 2 CPUs (see
    tests/slurm_cluster.py), torn down at the end of the session. Skips where Slurm or munge is not
    installed (scripts/test.sh installs both) or without root (munged runs as the munge user)."""
    from slurm_cluster import SlurmCluster, missing_binaries

    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm test cluster needs {', '.join(missing)}: apt-get install slurm-wlm munge "
                    "(scripts/test.sh does)")
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster runs slurmd as root and munged as the munge user: run as root")
    cluster = SlurmCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        if request.session.testsfailed:
            print(f"\nSlurm test cluster files (configuration, logs) kept in {cluster.root}")
        else:
            cluster.remove()


@pytest.fixture(scope="module")
def triton_interpreter():
    """TRITON_INTERPRET=1 on a CPU for one kernel test module's tests (Triton reads it lazily on first
    launches too), the environment as it was outside; kernel test modules use it with ``pytestmark``."""
    from triton_tests import interpreter_env

    with interpreter_env():
        yield


HEADER_PACKAGES = ("torch", "triton", "deepspeed", "transformers", "kernels", "peft", "tokenizers", "safetensors",
                   "sentencepiece", "numpy", "omegaconf", "tensorboard", "pytest")


def pytest_report_header(config) -> list[str]:
    """What decides which tests run: the versions of the main packages (and whether the environment is
    requirements.lock's), the CPU and its bf16/fp16 flags, and the precisions DeepSpeed's ranks can run."""
    import importlib.metadata
    import sys

    from hataori.precision import cpu_flags, cpu_name, supported
    from hataori.train.zero import rank_device

    sys.path.insert(0, str(REPO / "scripts"))
    from requirements_lock import LockError, differences, installed, read

    versions = []
    for name in HEADER_PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    try:
        differ = differences(read()[1], installed())
        lock = ("every package at requirements.lock's version" if not differ
                else f"{len(differ)} difference(s) from requirements.lock: {'; '.join(differ[:5])}")
    except LockError as err:
        lock = str(err)
    flags = cpu_flags()
    device = rank_device()
    return [f"packages: {', '.join(versions)}", f"lock: {lock}",
            f"cpu: {cpu_name()}; " + ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in flags.items()),
            f"precisions on {device.type}: {', '.join(supported(device))}"]
