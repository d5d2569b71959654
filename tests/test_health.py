"""Trust what is read. No NaN success: a non-finite weight in a checkpoint or an import source is an error
naming the tensor (generate, eval, export hf, init.from_hf), and eval reports no score from non-finite
log-likelihoods. No skipped identity check: an init source's tokenizer.json, or a run's provenance.json when
its tokenizer files are gone, must be the run's tokenizer.

Run folders are made in-process (helpers.make_run: a ZeRO-0 checkpoint file and its manifest); the
tokenizer is conftest's ``jcqa_tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_run

from hataori.cli import main as hataori_main
from hataori.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def tokenizer_dir(jcqa_tokenizer) -> Path:
    return jcqa_tokenizer


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

    from hataori.interop.load import InitConfig, load_initial_weights, open_source
    from hataori.tokenizer.model import Tokenizer

    run, _ = make_run(tmp_path / "run", tokenizer_dir)
    hf = tmp_path / "hf"
    assert hataori_main(["export", "hf", str(run), "--output", str(hf), "--dtype", "fp32"]) == 0
    (shard,) = hf.glob("model-*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    capsys.readouterr()

    from hataori.checkpoint.record import model_config, read_config

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


def other_tokenizer(tokenizer_dir: Path, folder: Path) -> Path:
    """A tokenizer of as many pieces as ``tokenizer_dir``'s, trained as BPE on the same text: other pieces."""
    import sentencepiece as spm

    from hataori.tokenizer.model import Tokenizer

    folder.mkdir(exist_ok=True)
    text = folder / "text.txt"
    pieces = (tokenizer_dir / "tokenizer.vocab").read_text(encoding="utf-8")
    text.write_text(pieces.replace("\t", " "), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), model_type="bpe",
                                   vocab_size=Tokenizer(tokenizer_dir).vocab_size, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    return folder / "tokenizer.model"


def test_an_init_source_with_only_tokenizer_json_is_checked_against_the_runs_tokenizer(tokenizer_dir, tmp_path):
    from hataori.checkpoint.record import model_config, read_config
    from hataori.interop.load import InitConfig, open_source
    from hataori.tokenizer.model import Tokenizer

    run, _ = make_run(tmp_path / "run", tokenizer_dir)
    hf = tmp_path / "hf"
    assert hataori_main(["export", "hf", str(run), "--output", str(hf), "--dtype", "fp32"]) == 0
    (hf / "tokenizer.model").unlink()  # transformers' usual layout: tokenizer.json only
    cfg = model_config(read_config(run))
    ours = Tokenizer(tokenizer_dir)
    assert open_source(InitConfig(from_hf=str(hf)), cfg, ours) is not None
    other = Tokenizer(other_tokenizer(tokenizer_dir, tmp_path / "bpe"))
    if other.vocab_size != ours.vocab_size:
        pytest.skip(f"the BPE tokenizer came out with {other.vocab_size} pieces, not {ours.vocab_size}")
    with pytest.raises(ConfigError) as err:
        open_source(InitConfig(from_hf=str(hf)), cfg, other)
    assert str(err.value).startswith(f"tokenizer: {other.path} is not the tokenizer init.from_hf={hf} was trained "
                                     "with: id ")
    # A tokenizer.json of fewer tokens than the run's tokenizer: refused by the first id it lacks.
    fast = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))
    fast["model"]["vocab"] = fast["model"]["vocab"][:1000]
    (hf / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"id 1000 is .* and None in tokenizer.json"):
        open_source(InitConfig(from_hf=str(hf)), cfg, ours)


def test_init_from_run_checks_the_tokenizer_its_provenance_records(tokenizer_dir, tmp_path):
    """The source run's tokenizer files are gone; its provenance.json still says which it trained with."""
    import shutil

    from hataori.checkpoint.record import model_config, read_config, record_provenance
    from hataori.interop.load import InitConfig, open_source
    from hataori.tokenizer.model import Tokenizer

    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    run, _ = make_run(tmp_path / "run", copy)
    record_provenance(run, tokenizer=Tokenizer(copy), datasets=[])
    shutil.rmtree(copy)
    cfg = model_config(read_config(run))
    assert open_source(InitConfig(from_run=str(run)), cfg, Tokenizer(tokenizer_dir)) is not None  # the same bytes
    other = Tokenizer(other_tokenizer(tokenizer_dir, tmp_path / "bpe"))
    if other.vocab_size != cfg.vocab_size:
        pytest.skip(f"the BPE tokenizer came out with {other.vocab_size} pieces, not {cfg.vocab_size}")
    with pytest.raises(ConfigError, match=rf"is not the tokenizer init.from_run={run} was trained with \(fingerprint "
                                        rf"{Tokenizer(tokenizer_dir).fingerprint}, in {run / 'provenance.json'}\)"):
        open_source(InitConfig(from_run=str(run)), cfg, other)


def damage_hf(folder: Path, how: str) -> Path:
    """Damage a model folder in transformers' layout; the file a message must name."""
    (shard,) = folder.glob("model-*.safetensors")
    if how == "config-list":
        (folder / "config.json").write_text("[1, 2]\n")
        return folder / "config.json"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2] if how == "truncated" else data[:8] + b"\xff" * 32 + data[40:])
    return shard


@pytest.mark.parametrize("how, message", [
    ("config-list", "holds a JSON list, not the object of model settings transformers writes"),
    ("truncated", "not a readable safetensors file (Error while deserializing header: incomplete metadata"),
    ("garbage", "not a readable safetensors file (Error while deserializing header: invalid UTF-8 in header"),
])
def test_a_damaged_import_source_is_named_not_a_traceback(how, message, tokenizer_dir, tmp_path, capsys):
    """A model folder whose config.json is a JSON list, or whose safetensors file is cut in half or has garbage
    in its header: init.from_hf and eval of the folder name the file."""
    from hataori.checkpoint.record import model_config, read_config
    from hataori.interop.load import InitConfig, open_source
    from hataori.tokenizer.model import Tokenizer

    run, _ = make_run(tmp_path / "run", tokenizer_dir)
    hf = tmp_path / "hf"
    assert hataori_main(["export", "hf", str(run), "--output", str(hf), "--dtype", "fp32"]) == 0
    named = damage_hf(hf, how)
    capsys.readouterr()
    with pytest.raises(InputError) as err:
        open_source(InitConfig(from_hf=str(hf)), model_config(read_config(run)), Tokenizer(tokenizer_dir))
    assert str(err.value).startswith(f"{named}: {message}"), str(err.value)
    assert hataori_main(["eval", str(hf), "--task", "jcommonsenseqa", "--limit", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"hataori: error: {named}: {message}")


@pytest.mark.parametrize("how", ["malformed", "other-shape"])
def test_a_run_config_that_does_not_describe_its_checkpoint_is_named(how, tokenizer_dir, tmp_path, capsys):
    """config.yaml cut into invalid YAML, or edited to another width where the manifest records no model
    (a checkpoint adopted by `checkpoint verify --adopt`): export hf, generate and eval name the file."""
    run, checkpoint = make_run(tmp_path / "run", tokenizer_dir)
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text("model: [unclosed\n" if how == "malformed" else text.replace("d_model: 32", "d_model: 64"))
    expected = (f"{config}: not valid YAML (while parsing a flow sequence); hataori pretrain wrote it"
                if how == "malformed"
                else f"{checkpoint}: weight tok_embeddings.weight has shape (2048, 32), the config makes (2048, 64) "
                     f"(and 20 more): the checkpoint and {config} do not belong together")
    for argv in (["export", "hf", str(run), "--output", str(tmp_path / "hf")],
                 ["generate", str(run), "吾輩は", "--device", "cpu"],
                 ["eval", str(run), "--task", "jcommonsenseqa", "--limit", "2", "--device", "cpu"]):
        assert hataori_main(argv) == 2, argv
        assert capsys.readouterr().err.startswith(f"hataori: error: {expected}"), argv
    assert not (tmp_path / "hf").exists()
