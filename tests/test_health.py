"""No NaN success: a non-finite weight in a checkpoint or an import source is an error naming the tensor
(generate, eval, export hf, init.from_hf), and eval reports no score from non-finite log-likelihoods.

Run folders are made in-process (a ZeRO-0 checkpoint file and its manifest, as tests/test_eval.py does); the
tokenizer is conftest's ``jcqa_tokenizer``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hataori.cli import main as hataori_main
from hataori.errors import InputError
from hataori.model import ModelConfig


@pytest.fixture(scope="module")
def tokenizer_dir(jcqa_tokenizer) -> Path:
    return jcqa_tokenizer


def make_run(root: Path, tokenizer_dir: Path, change=None) -> tuple[Path, Path]:
    """(run folder, its checkpoint) of a tiny model whose state dict ``change`` edits in place first."""
    from hataori.config import to_dict
    from hataori.tokenizer.model import Tokenizer
    from hataori.train.checkpoint import adopt
    from hataori.train.run import record_run

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=Tokenizer(tokenizer_dir).vocab_size, d_model=32, n_layers=2, n_heads=4,
                      ffn_hidden=64, max_seq_len=128)
    state = cfg.build().state_dict()
    if change is not None:
        change(state)
    run = record_run(root, {"model": to_dict(cfg), "tokenizer": str(tokenizer_dir)})
    checkpoint = run / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    torch.save({"module": state, "step": 1, "world_size": 1}, checkpoint / "mp_rank_00_model_states.pt")
    adopt(checkpoint)
    return run, checkpoint


def poke_nan(state: dict) -> None:
    state["blocks.1.attn.wk.weight"][3, 5] = float("nan")


def test_a_nan_weight_in_a_checkpoint_is_named_by_every_reader(tokenizer_dir, tmp_path, capsys):
    run, checkpoint = make_run(tmp_path / "run", tokenizer_dir, poke_nan)
    expected = (f"{checkpoint}: weight blocks.1.attn.wk.weight holds 1 non-finite value (NaN or inf) of 1,024; "
                "this checkpoint is not healthy")
    for argv in (["generate", str(run), "吾輩は", "--device", "cpu"],
                 ["eval", str(run), "--task", "jcommonsenseqa", "--limit", "2", "--device", "cpu"],
                 ["export", "hf", str(run), "--output", str(tmp_path / "hf")]):
        assert hataori_main(argv) == 2, argv
        assert capsys.readouterr().err.startswith(f"hataori: error: {expected}"), argv
    assert not (tmp_path / "hf").exists()


def test_a_nan_weight_in_an_import_source_is_named(tokenizer_dir, tmp_path, capsys):
    """A healthy export, then one weight of its safetensors file set to NaN: init.from_hf names the file's folder
    and the weight; eval of the folder too."""
    from safetensors.torch import load_file, save_file

    from hataori.tokenizer.model import Tokenizer
    from hataori.train.init import InitConfig, load_initial_weights, open_source

    run, _ = make_run(tmp_path / "run", tokenizer_dir)
    hf = tmp_path / "hf"
    assert hataori_main(["export", "hf", str(run), "--output", str(hf), "--dtype", "fp32"]) == 0
    (shard,) = hf.glob("model-*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    capsys.readouterr()

    from hataori.train.run import model_config, read_config

    cfg = model_config(read_config(run))
    plan = open_source(InitConfig(from_hf=str(hf)), cfg, Tokenizer(hf / "tokenizer.model"))
    with pytest.raises(InputError) as err:
        load_initial_weights(cfg.build(), plan)
    assert str(err.value).startswith(f"{hf}: weight blocks.0.mlp.w_up.weight holds 1 non-finite value (NaN or inf)")
    assert "start from another init source" in str(err.value)
    assert hataori_main(["eval", str(hf), "--task", "jcommonsenseqa", "--limit", "2", "--device", "cpu"]) == 2
    assert f"{hf}: weight blocks.0.mlp.w_up.weight holds 1 non-finite value" in capsys.readouterr().err


def test_eval_reports_no_score_from_overflowing_activations(tokenizer_dir, tmp_path, capsys):
    """Finite weights whose activations overflow fp32 (the final norm's scale at 3e38): every log-likelihood
    is NaN, and eval says so instead of reporting the accuracy of argmax over NaNs."""

    def overflow(state: dict) -> None:
        state["norm.weight"].fill_(3e38)

    run, _ = make_run(tmp_path / "run", tokenizer_dir, overflow)
    assert hataori_main(["eval", str(run), "--task", "jcommonsenseqa", "--limit", "3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "log-likelihoods are not finite (NaN or inf) for 15 of 15 choices, the first in the example of line " in err
    corpus = tmp_path / "text.txt"
    corpus.write_text("吾輩は猫である。\n\n名前はまだ無い。\n", encoding="utf-8")
    assert hataori_main(["eval", str(run), "--task", "bpc", "--data", str(corpus), "--device", "cpu"]) == 2
    assert f"negative log-likelihood of {corpus} is not finite (nan)" in capsys.readouterr().err
