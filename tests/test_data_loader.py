"""The blending, packing loader: no token lost, boundaries right, blend shares, ranks, and an exact
resume in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hataori.cli import main as hataori_main
from hataori.config import load
from hataori.corpus.sources import SourceConfig
from hataori.data.loader import DataConfig, DatasetSpec, PackedLoader
from hataori.data.prepare import PrepareConfig, prepare
from hataori.data.shards import Dataset
from hataori.errors import ConfigError, HataoriError

SLICE_DOCS = 300


@pytest.fixture(scope="module")
def datasets(ja_corpus: Path, ja_tokenizer: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Two datasets from a slice of the corpus: A holds documents as they are, B joins them three
    at a time (so its documents are about three times longer)."""
    root = tmp_path_factory.mktemp("loader")
    texts = []
    with open(ja_corpus / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if text:
                texts.append(text[:4000])  # keep the slice small whatever the corpus's document sizes
            if len(texts) == SLICE_DOCS:
                break
    half = len(texts) // 2
    groups = {"a": texts[:half], "b": ["\n".join(texts[i:i + 3]) for i in range(half, len(texts), 3)]}
    out = []
    for name, docs in groups.items():
        corpus = root / f"{name}.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
        prepare(PrepareConfig(sources=[SourceConfig(path=str(corpus))], tokenizer=str(ja_tokenizer),
                              output=str(root / name), val_fraction=0.0, shard_tokens=30_000, progress=False))
        out.append(root / name)
    return out[0], out[1]


def loader(paths, weights=None, *, seq_len=64, batch=4, seed=0, rank=0, world=1) -> PackedLoader:
    specs = [DatasetSpec(path=str(p), weight=w) for p, w in zip(paths, weights or [1.0] * len(paths))]
    return DataConfig(datasets=specs, seq_len=seq_len, seed=seed).build(batch, rank=rank, world_size=world)


def stream_of(batches) -> np.ndarray:
    """The token stream the batches cover: each sequence's inputs, back to back."""
    return np.concatenate([b.inputs.ravel() for b in batches])


def test_one_epoch_holds_every_document_once_in_order(datasets):
    a = Dataset(datasets[0])
    eos = a.eos_id
    ld = loader([datasets[0]], seq_len=48, batch=3)
    batches = [next(ld) for _ in range(a.num_tokens // (48 * 3) + 2)]
    stream = stream_of(batches)
    # targets are the stream shifted by one, across sequences and batches
    targets = np.concatenate([b.targets.ravel() for b in batches])
    assert np.array_equal(targets[:-1], stream[1:])
    # the first epoch, cut after each EOS, is every document of the dataset exactly once, whole
    epoch = stream[:a.num_tokens]
    cuts = np.flatnonzero(epoch == eos) + 1
    assert cuts[-1] == a.num_tokens and len(cuts) == a.num_docs
    packed = Counter(tuple(doc) for doc in np.split(epoch, cuts[:-1]))
    assert packed == Counter(tuple(a.doc(i).tolist()) for i in range(a.num_docs))
    # in the seeded permutation's order
    order = ld.permutation(0, 0)
    assert np.array_equal(epoch, np.concatenate([a.doc(int(i)) for i in order]))
    assert ld.epochs == [1]
    # the next epoch is another order of the same documents
    assert not np.array_equal(ld.permutation(0, 1), order)


def test_positions_and_cu_seqlens_mark_document_segments(datasets):
    eos = Dataset(datasets[0]).eos_id
    ld = loader(datasets, seq_len=96, batch=4)
    for _ in range(5):
        batch = next(ld)
        for row, positions in zip(batch.inputs, batch.positions):
            expected, pos = [], 0  # reference from token values: an input EOS opens the next segment
            for t, token in enumerate(row):
                pos = 0 if t == 0 or token == eos else pos + 1
                expected.append(pos)
            assert positions.tolist() == expected
        ids = batch.doc_ids()
        assert np.array_equal(ids[:, 1:] != ids[:, :-1], batch.positions[:, 1:] == 0) and not ids[:, 0].any()
        cu = batch.cu_seqlens()
        assert cu[0] == 0 and cu[-1] == batch.inputs.size and np.all(np.diff(cu) > 0)
        assert set(range(0, batch.inputs.size, 96)) <= set(cu.tolist())  # every sequence starts a segment
        flat = batch.inputs.ravel()
        assert all(flat[s] == eos or s % 96 == 0 for s in cu[:-1])
        # within a segment, only the last target may be an EOS: no target crosses into the next document
        for start, end in zip(cu[:-1], cu[1:]):
            assert not np.any(batch.targets.ravel()[start:end - 1] == eos)


def test_blend_shares_follow_the_weights_in_tokens(datasets):
    a, b = (Dataset(p) for p in datasets)
    assert b.num_tokens / b.num_docs > 2 * a.num_tokens / a.num_docs  # shares in documents would differ
    ld = loader(datasets, [3.0, 1.0], seq_len=1024, batch=8, seed=1)
    counts = np.zeros(2)
    for _ in range(2000):  # 16M tokens, some 10k documents: the share's spread is about 0.006
        counts += np.bincount(next(ld).sources.ravel(), minlength=2)
    share = counts[0] / counts.sum()
    assert abs(share - 0.75) < 0.025, share  # drawing documents 3:1 would give about 0.5


def test_data_parallel_ranks_split_the_same_stream(datasets):
    whole = loader(datasets, [1.0, 2.0], seq_len=32, batch=6)
    ranks = [loader(datasets, [1.0, 2.0], seq_len=32, batch=2, rank=r, world=3) for r in range(3)]
    for _ in range(20):
        expected = next(whole)
        parts = [next(ld) for ld in ranks]
        for field in ("inputs", "targets", "positions", "sources"):
            assert np.array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(expected, field))
    states = [ld.state_dict() for ld in ranks]
    assert states[0] == states[1] == states[2] == whole.state_dict()


def test_order_is_determined_by_the_seed(datasets):
    one, same, other = (loader(datasets, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        x, y, z = next(one), next(same), next(other)
        assert np.array_equal(x.inputs, y.inputs)
    assert not np.array_equal(x.inputs, z.inputs)


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hataori.data.loader import DataConfig, DatasetSpec
    args = json.loads(sys.argv[1])
    cfg = DataConfig(datasets=[DatasetSpec(**d) for d in args["datasets"]], seq_len=args["seq_len"], seed=args["seed"])
    ld = cfg.build(args["batch"], rank=args["rank"], world_size=args["world"])
    ld.load_state_dict(json.loads(open(args["state"]).read()))
    batches = [next(ld) for _ in range(args["more"])]
    np.savez(args["out"], **{f: np.stack([getattr(b, f) for b in batches])
                             for f in ("inputs", "targets", "positions", "sources")})
""")


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_resume_in_a_fresh_process_continues_exactly(datasets, tmp_path, rank, world):
    settings = {"datasets": [{"path": str(datasets[0]), "weight": 1.0}, {"path": str(datasets[1]), "weight": 2.0}],
                "seq_len": 80, "seed": 3, "batch": 3, "rank": rank, "world": world}
    n, m = 37, 25
    ld = loader(datasets, [1.0, 2.0], seq_len=80, batch=3, seed=3, rank=rank, world=world)
    for _ in range(n):
        next(ld)
    state = ld.state_dict()
    (tmp_path / "state.json").write_text(json.dumps(state))
    tail = [next(ld) for _ in range(m)]

    args = {**settings, "state": str(tmp_path / "state.json"), "more": m, "out": str(tmp_path / "resumed.npz")}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(args)], check=True, timeout=120)
    resumed = np.load(tmp_path / "resumed.npz")

    straight = loader(datasets, [1.0, 2.0], seq_len=80, batch=3, seed=3, rank=rank, world=world)
    reference = [next(straight) for _ in range(n + m)]
    for field in ("inputs", "targets", "positions", "sources"):
        assert np.array_equal(resumed[field], np.stack([getattr(b, field) for b in reference[n:]]))
        assert np.array_equal(np.stack([getattr(b, field) for b in tail]), resumed[field])
    assert state["cursor"]["offset"] > 0  # saved in the middle of a document
    assert len(json.dumps(state)) < 1000  # small: no token buffers in it


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_sees_every_document_once(datasets, before, after):
    """A state saved by ranks of one world size, restored by ranks of another mid-epoch: the ranks'
    batches, in rank order, continue the one global stream, so the epoch is every document once."""
    a = Dataset(datasets[0])

    def steps(loaders, count):
        return [np.concatenate([next(ld).inputs for ld in loaders]) for _ in range(count)]

    first = [loader([datasets[0]], seq_len=48, batch=3, rank=r, world=before) for r in range(before)]
    done = steps(first, 11)
    resumed = [loader([datasets[0]], seq_len=48, batch=3, rank=r, world=after) for r in range(after)]
    for ld in resumed:
        ld.load_state_dict(first[0].state_dict())
    done += steps(resumed, a.num_tokens // (48 * 3 * after) + 2)
    stream = np.concatenate([batch.ravel() for batch in done])
    straight = loader([datasets[0]], seq_len=48, batch=3)
    assert np.array_equal(stream, stream_of([next(straight) for _ in range(len(stream) // (48 * 3))]))
    epoch = stream[:a.num_tokens]
    cuts = np.flatnonzero(epoch == a.eos_id) + 1
    packed = Counter(tuple(doc) for doc in np.split(epoch, cuts[:-1]))
    assert packed == Counter(tuple(a.doc(i).tolist()) for i in range(a.num_docs))


def test_restore_refuses_other_datasets_or_seed(datasets):
    state = loader([datasets[0]]).state_dict()
    with pytest.raises(HataoriError, match=r"saved for other datasets: fingerprints .*resume with the same datasets"):
        loader([datasets[1]]).load_state_dict(state)
    with pytest.raises(HataoriError, match=r"saved for other datasets"):
        loader(datasets).load_state_dict(state)
    with pytest.raises(HataoriError, match=r"saved with seed 0, the config has 5; set data.seed=0"):
        loader([datasets[0]], seed=5).load_state_dict(state)


def test_build_refuses_datasets_of_another_tokenizer(datasets):
    found = Dataset(datasets[0]).tokenizer_fingerprint
    cfg = DataConfig(datasets=[DatasetSpec(path=str(datasets[0]))])
    with pytest.raises(HataoriError, match=rf"encoded with tokenizer fingerprint {found}, but 0000000000000000 was "
                                           "expected; use the tokenizer the dataset was made with"):
        cfg.build(2, tokenizer_fingerprint="0000000000000000")
    assert cfg.build(2, tokenizer_fingerprint=found).fingerprints == [Dataset(datasets[0]).fingerprint]


def test_data_config_validation(datasets, tmp_path):
    cfg = load(DataConfig, [], [f"datasets=[{{path: {datasets[0]}, weight: 2}}]", "seq_len=128"])
    assert cfg.datasets[0].weight == 2.0 and cfg.seq_len == 128 and cfg.split == "train"
    with pytest.raises(ConfigError, match="seq_len: must be positive"):
        load(DataConfig, [], [f"datasets=[{{path: {datasets[0]}}}]", "seq_len=0"])
    with pytest.raises(ConfigError, match=r"datasets\[0\].weight: must be positive"):
        load(DataConfig, [], [f"datasets=[{{path: {datasets[0]}, weight: 0}}]"])
    with pytest.raises(HataoriError, match="val split holds no documents"):
        DataConfig(datasets=[DatasetSpec(path=str(datasets[0]))], split="val").build(2)


def test_bench_reports_tokens_per_second(datasets, capsys):
    assert hataori_main(["data", "bench", str(datasets[0]), f"{datasets[1]}:2", "--seq-len", "256",
                         "--batch", "4", "--seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s per rank" in out and "draw probability" in out


def test_bench_takes_the_data_config_from_yaml_and_overrides(datasets, capsys, tmp_path):
    """A data config file (a train preset's data section) and key=value overrides, as training reads them;
    a key set by its flag too is refused."""
    config = tmp_path / "data.yaml"
    config.write_text("seq_len: 128\nseed: 3\n")
    assert hataori_main(["data", "bench", str(datasets[0]), str(config), "--batch", "2", "--seconds", "0.2"]) == 0
    assert "batches of 2 x 128 tokens" in capsys.readouterr().out
    assert hataori_main(["data", "bench", str(datasets[0]), "seq_len=64", "--batch", "2", "--seconds", "0.2"]) == 0
    assert "batches of 2 x 64 tokens" in capsys.readouterr().out
    assert hataori_main(["data", "bench", str(datasets[0]), "seq_len=64", "--seq-len", "32", "--seconds", "0.2"]) == 2
    assert "seq_len: is set twice, by --seq-len and by seq_len=..." in capsys.readouterr().err
