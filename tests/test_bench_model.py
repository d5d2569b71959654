"""benchmarks/bench_model.py as a CPU smoke test: every CPU variant trains, and they agree on the loss.

Times are printed by the benchmark and never checked here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from helpers import load_script

from hataori.config import load
from hataori.model import ModelConfig


bench_model = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py")
CPU_VARIANTS, PRESETS, Shape = bench_model.CPU_VARIANTS, bench_model.PRESETS, bench_model.Shape
main, run_variants = bench_model.main, bench_model.run_variants

TINY = ["d_model=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "vocab_size=512", "max_seq_len=64"]


def test_cpu_variants_agree_on_the_loss():
    base = load(ModelConfig, [PRESETS / "toy.yaml"], TINY)
    shape = Shape(micro_batch=2, seq_len=32, steps=2, warmup=1, doc_len=8)
    results = list(run_variants(base, CPU_VARIANTS, shape, torch.device("cpu"), torch.float32))

    assert [r.name for r in results] == [v.name for v in CPU_VARIANTS]
    for r in results:
        assert r.ran, r.note
        assert math.isfinite(r.first_loss) and math.isfinite(r.last_loss)
        assert r.tokens_per_s > 0
        assert (r.attention, r.kernels) == ("sdpa", "torch")  # what auto chooses on a CPU too
    reference = results[0].first_loss
    assert abs(reference - math.log(512)) < 0.5  # a fresh model guesses about uniformly
    for r in results[1:]:
        assert abs(r.first_loss - reference) < 1e-4, (r.name, r.first_loss, reference)
    assert results[0].last_loss < reference  # by the third step, two AdamW updates on one batch lowered its loss


def test_main_prints_one_row_per_variant(capsys):
    assert main(["--device", "cpu", "--micro-batch", "2", "--seq-len", "32", "--steps", "1", "--warmup", "1",
                 "--variants", "sdpa+torch,sdpa+torch+chunked", *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    rows = [line.split() for line in lines[header + 1:]]
    assert [row[0] for row in rows] == ["sdpa+torch", "sdpa+torch+chunked"]
    for row in rows:
        assert row[6] == "-" and row[7] == "-"  # no MFU nor memory figure on a CPU
        assert all(math.isfinite(float(loss)) for loss in row[8:10])
