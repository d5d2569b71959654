"""``hataori generate``: the samplers against explicit references, greedy decoding against teacher forcing,
and real DeepSpeed checkpoints (ZeRO-0 and ZeRO-3, two processes) against the weights they were saved from."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from capabilities import needs
from generate_worker import SEQ_LEN, model_config
from ranks import launch_ranks, log_tails

from hataori.checkpoint.states import resolve_checkpoint
from hataori.cli import main as hataori_main
from hataori.errors import HataoriError
from hataori.eval.generate import Sampling, filtered_probs, generate, next_token, top_k_filter, top_p_filter
from hataori.interop.load import load_model

LAUNCH_TIMEOUT_S = 120
WORKER = Path(__file__).with_name("generate_worker.py")
SENTENCES = [
    "吾輩は猫である。名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。",
    "何でも薄暗いじめじめした所で泣いていた事だけは記憶している。",
    "このコマンドはファイルの一覧を表示します。", "設定ファイルを編集してから再起動してください。",
    "東京の天気は晴れのち曇りです。",
    "日本語の文章を読み込んで学習します。", "モデルは次の単語を予測します。",
]


# ----------------------------------------------------------------------------- samplers


def test_top_k_keeps_exactly_the_k_largest():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen)
    for k in (1, 3, 17, 49):
        kept = top_k_filter(logits, k)
        for row, out in zip(logits.tolist(), kept):
            largest = set(sorted(range(50), key=lambda i: -row[i])[:k])
            assert {i for i in range(50) if out[i] != float("-inf")} == largest
            assert all(out[i] == row[i] for i in largest)
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 50), logits)
    ties = torch.zeros(1, 10)
    assert int((top_k_filter(ties, 4) > float("-inf")).sum()) == 4


def explicit_top_p(row: list[float], p: float) -> set[int]:
    """Indices of the smallest most-probable prefix with probability >= p, by an explicit loop."""
    probs = np.exp(np.array(row, dtype=np.float64) - max(row))
    probs /= probs.sum()
    kept, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 40, generator=gen, dtype=torch.float64) * 2
    kept = top_p_filter(logits, p)
    for row, out in zip(logits.tolist(), kept):
        assert {i for i, x in enumerate(out.tolist()) if x != float("-inf")} == explicit_top_p(row, p)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_temperature_towards_zero_is_greedy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 30, generator=gen)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(next_token(logits, Sampling(temperature=0.0)), argmax)
    assert torch.equal(next_token(logits, Sampling(greedy=True, temperature=5.0)), argmax)
    for seed in range(5):
        draws = next_token(logits, Sampling(temperature=1e-4), torch.Generator().manual_seed(seed))
        assert torch.equal(draws, argmax)


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=5),
                                      Sampling(temperature=1.3, top_p=0.8),
                                      Sampling(temperature=0.9, top_k=6, top_p=0.7)],
                         ids=["plain", "top-k", "top-p", "top-k-top-p"])
def test_sampling_frequencies_match_the_filtered_distribution(sampling):
    """One draw per seed over 4000 seeds; the counts against an independently computed distribution."""
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.6, 0.5, 0.1, -0.3, -1.0, -2.0])
    scaled = logits.double().numpy() / sampling.temperature
    allowed = set(range(10))
    if sampling.top_k:
        allowed &= set(np.argsort(-scaled)[:sampling.top_k].tolist())
    masked = np.where([i in allowed for i in range(10)], scaled, -np.inf)
    allowed &= explicit_top_p(masked.tolist(), sampling.top_p) if sampling.top_p < 1 else allowed
    expected = np.where([i in allowed for i in range(10)], np.exp(scaled - scaled.max()), 0.0)
    expected /= expected.sum()
    np.testing.assert_allclose(filtered_probs(logits, sampling).double().numpy(), expected, atol=1e-6)

    n = 4000
    counts = np.zeros(10)
    for seed in range(n):
        counts[int(next_token(logits, sampling, torch.Generator().manual_seed(seed)))] += 1
    assert counts[expected == 0].sum() == 0, "drew a filtered-out token"
    live = expected > 0
    chi2 = (((counts - n * expected)[live]) ** 2 / (n * expected[live])).sum()
    # chi-square with live - 1 <= 9 degrees of freedom: 27.9 is its 0.999 quantile.
    assert chi2 < 27.9, f"chi2 {chi2:.1f}; counts {counts.tolist()} expected {(n * expected).round(1).tolist()}"


def test_sampling_options_are_checked():
    with pytest.raises(Exception, match="top-p"):
        Sampling(top_p=0.0)
    with pytest.raises(Exception, match="temperature"):
        Sampling(temperature=-1.0)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    (["--temperature", "-1"], "--temperature: must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature: must be a finite number >= 0 (0: greedy), got nan"),
    (["--temperature", "inf"], "--temperature: must be a finite number >= 0 (0: greedy), got inf"),
    (["--top-k", "-1"], "--top-k: must be >= 0 (0: no limit), got -1"),
    (["--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p: must be in (0, 1], got nan"),
    (["--device", "gpu0"], "--device: 'gpu0' is not a device; use cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device: meta: use cpu, cuda or cuda:N"),
])
def test_generate_options_are_checked(argv, message, tmp_path, capsys):
    assert hataori_main(["generate", str(tmp_path), "こんにちは", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cuda_device_without_cuda_is_refused(tmp_path, capsys, monkeypatch):
    """A torch without a usable GPU: the error names --device and what this build has, instead of torch's
    AssertionError; an index past the GPUs there are is refused too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hataori_main(["generate", str(tmp_path), "こんにちは", "--device", "cuda"]) == 2
    built = f"built for CUDA {torch.version.cuda} but finds no GPU" if torch.version.cuda else "built without CUDA"
    assert (f"--device: cuda: this torch {torch.__version__} is {built} (torch.cuda.is_available() is False); "
            "use --device cpu") in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert hataori_main(["generate", str(tmp_path), "こんにちは", "--device", "cuda:2"]) == 2
    assert "--device: cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- decoding with a model


def test_greedy_generation_is_argmax_decoding():
    """Each generated token is the argmax of one teacher-forced forward pass over the whole output, and
    generation stops at EOS; a prompt past max_seq_len keeps its last max_seq_len - max_new_tokens tokens."""
    torch.manual_seed(0)
    model = model_config().build().eval()
    prompt = [3, 14, 15, 92, 65]
    new = generate(model, prompt, max_new_tokens=12, eos_id=None, sampling=Sampling(greedy=True))
    assert len(new) == 12
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0]  # (T, V)
    assert new == logits[len(prompt) - 1:-1].argmax(dim=-1).tolist()

    stop = generate(model, prompt, max_new_tokens=12, eos_id=new[2], sampling=Sampling(greedy=True))
    assert stop == new[:new.index(new[2]) + 1]

    long_prompt = list(range(1, 41))  # 40 > max_seq_len = 32
    first = generate(model, long_prompt, max_new_tokens=1, eos_id=None, sampling=Sampling(greedy=True))
    with torch.no_grad():
        assert first == [int(model(torch.tensor([long_prompt[-(SEQ_LEN - 1):]]))[0, -1].argmax())]


@pytest.mark.parametrize("sampling", [Sampling(greedy=True), Sampling(top_k=20)], ids=["greedy", "sampled"])
def test_generation_refuses_non_finite_logits(sampling):
    """One NaN in a query projection makes every query of that head NaN: generation stops with an error at
    the first new token instead of printing tokens (SDPA's CPU kernel returned finite rows for NaN queries,
    and normal-looking text, until the sdpa backend checked its inputs)."""
    torch.manual_seed(0)
    model = model_config().build().eval()
    with torch.no_grad():
        model.blocks[0].attn.wq.weight[0, 0] = float("nan")
        assert not torch.isfinite(model(torch.tensor([[3, 14, 15, 92, 65]]))[0, -1]).any()
    with pytest.raises(HataoriError, match="logits for new token 1 hold NaN or inf"):
        generate(model, [3, 14, 15, 92, 65], max_new_tokens=4, eos_id=None, sampling=sampling,
                 generator=torch.Generator().manual_seed(0))


def test_seeded_sampling_repeats():
    torch.manual_seed(0)
    model = model_config().build().eval()
    runs = [generate(model, [1, 2, 3], max_new_tokens=10, eos_id=None, sampling=Sampling(top_k=20, top_p=0.9),
                     generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ----------------------------------------------------------------------------- real checkpoints


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny SentencePiece model of the sentences above."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_writer=model, vocab_size=120,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out


@pytest.fixture(scope="module")
def other_tokenizer_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A BPE model of the same sentences with as many pieces as ``tokenizer_dir``'s: only the fingerprint differs."""
    import sentencepiece as spm

    from hataori.tokenizer.model import Tokenizer

    out = tmp_path_factory.mktemp("other-tokenizer")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(out / "tokenizer"),
                                   vocab_size=Tokenizer(tokenizer_dir).vocab_size, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    return out


def test_only_the_tokenizer_the_run_was_trained_with_is_used(tokenizer_dir, other_tokenizer_dir, tmp_path):
    """The fingerprint recorded in provenance.json, else that of the run's config's tokenizer, must be the
    tokenizer's; and its size the model's."""
    from hataori.checkpoint.record import read_config, record_provenance, record_run, run_tokenizer
    from hataori.config import to_dict
    from hataori.errors import ConfigError
    from hataori.tokenizer.model import Tokenizer

    ours, other = Tokenizer(tokenizer_dir), Tokenizer(other_tokenizer_dir)
    assert ours.vocab_size == other.vocab_size and ours.fingerprint != other.fingerprint
    run = tmp_path / "run"
    record_run(run, {"model": to_dict(model_config(ours.vocab_size)), "tokenizer": str(tokenizer_dir)})
    config = read_config(run)
    assert run_tokenizer(run, config, None, ours.vocab_size).fingerprint == ours.fingerprint
    assert run_tokenizer(run, config, str(tokenizer_dir / "tokenizer.model"), ours.vocab_size).path == ours.path
    with pytest.raises(ConfigError) as err:
        run_tokenizer(run, config, str(other_tokenizer_dir), ours.vocab_size)
    assert str(err.value) == (f"--tokenizer: {other.path} has fingerprint {other.fingerprint}, but the run {run} was "
                              f"trained with {ours.path} (fingerprint {ours.fingerprint}); pass that tokenizer")

    record_provenance(run, tokenizer=other, datasets=[])  # provenance.json outranks the config's path
    assert run_tokenizer(run, config, str(other_tokenizer_dir), ours.vocab_size).fingerprint == other.fingerprint
    with pytest.raises(ConfigError) as err:
        run_tokenizer(run, config, None, ours.vocab_size)
    assert str(err.value).startswith(f"tokenizer: {ours.path} has fingerprint {ours.fingerprint}, but the run {run} "
                                     f"was trained with {other.path.resolve()} (fingerprint {other.fingerprint})")

    (run / "provenance.json").unlink()
    with pytest.raises(ConfigError) as err:
        run_tokenizer(run, config, None, ours.vocab_size + 1)
    assert str(err.value) == (f"tokenizer: {ours.path} has {ours.vocab_size} pieces but the run's model.vocab_size "
                              f"is {ours.vocab_size + 1}; pass the tokenizer the run was trained with")


@needs("bf16")
def test_generate_in_bf16_is_the_model_built_in_bf16(tokenizer_dir, tmp_path, capsys):
    """``--dtype bf16`` decodes as a model built in bf16 (parameters in bf16, rotary tables in fp32, as
    DeepSpeed trains it) holding the checkpoint's weights rounded to bf16."""
    from hataori.checkpoint.record import record_run
    from hataori.checkpoint.verify import adopt
    from hataori.config import to_dict
    from hataori.tokenizer.model import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    torch.manual_seed(4)
    model = model_config(tokenizer.vocab_size).build()
    run = record_run(tmp_path / "run", {"model": to_dict(model.config), "tokenizer": str(tokenizer_dir)})
    checkpoint = run / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "step": 1, "world_size": 1}, checkpoint / "mp_rank_00_model_states.pt")
    adopt(checkpoint)

    half = model.config.build("cpu", torch.bfloat16)
    half.load_state_dict({k: v.bfloat16() for k, v in model.state_dict().items() if not k.startswith("rope_")},
                         strict=False)
    prompt_text = "吾輩は猫"
    prompt = [tokenizer.eos_id] + tokenizer.encode([prompt_text])[0]
    new = generate(half.eval(), prompt, max_new_tokens=12, eos_id=tokenizer.eos_id, sampling=Sampling(greedy=True))
    capsys.readouterr()
    assert hataori_main(["generate", str(run), prompt_text, "--greedy", "--max-new-tokens", "12", "--device", "cpu",
                         "--dtype", "bf16"]) == 0
    assert (capsys.readouterr().out.rstrip("\n")
            == prompt_text + tokenizer.decode([t for t in new if t != tokenizer.eos_id]))


def launch(args: list[str], log_dir: Path, nproc: int = 2) -> None:
    """Run this file's worker on ``nproc`` processes of one group, within a hard time limit."""
    codes = launch_ranks(str(WORKER), args, log_dir, nproc, LAUNCH_TIMEOUT_S)
    assert codes == [0] * nproc, f"exit codes {codes}:\n{log_tails(log_dir)}"


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("stage", [0, 3])
def test_generate_from_a_deepspeed_checkpoint(stage, tokenizer_dir, other_tokenizer_dir, tmp_path, capsys):
    """Train two steps with ZeRO-``stage`` on two processes, checkpoint, and keep the in-memory weights;
    ``hataori generate`` on the run must load exactly those weights and continue the prompt as a model
    holding them does."""
    from hataori.tokenizer.model import Tokenizer

    run = tmp_path / "run"
    launch(["train", "--stage", str(stage), "--run-dir", str(run), "--tokenizer", str(tokenizer_dir)],
           tmp_path / "logs")
    run_dir, checkpoint = resolve_checkpoint(run)
    assert checkpoint.name == "step_00000002" and resolve_checkpoint(checkpoint) == (run, checkpoint)

    weights = torch.load(run / "weights.pt")
    loaded, _ = load_model(checkpoint)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    untrained = model_config(Tokenizer(tokenizer_dir).vocab_size).build().state_dict()
    assert not torch.equal(untrained["blocks.0.mlp.w_up.weight"], weights["blocks.0.mlp.w_up.weight"])

    tokenizer = Tokenizer(tokenizer_dir)
    reference = model_config(tokenizer.vocab_size).build()
    reference.load_state_dict(weights)
    prompt_text = "吾輩は猫"
    prompt = [tokenizer.eos_id] + tokenizer.encode([prompt_text])[0]
    new = generate(reference.eval(), prompt, max_new_tokens=10, eos_id=tokenizer.eos_id, sampling=Sampling(greedy=True))
    expected = prompt_text + tokenizer.decode([t for t in new if t != tokenizer.eos_id])

    capsys.readouterr()
    assert hataori_main(["generate", str(run), prompt_text, "--greedy", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    # A step folder, the tokenizer named on the command line, and seeded sampling that repeats.
    argv = ["generate", str(checkpoint), prompt_text, "--tokenizer", str(tokenizer_dir), "--seed", "3", "--top-k", "20"]
    assert hataori_main(argv) == 0 and hataori_main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second and first.startswith(prompt_text)
    # Another tokenizer of the same size is not the one the run was trained with.
    assert hataori_main(["generate", str(run), prompt_text, "--tokenizer", str(other_tokenizer_dir)]) == 2
    assert f"was trained with {tokenizer.path} (fingerprint {tokenizer.fingerprint})" in capsys.readouterr().err


def test_generate_errors(tmp_path, capsys):
    assert hataori_main(["generate", str(tmp_path), "こんにちは"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert hataori_main(["generate", str(tmp_path), "こんにちは"]) == 2
    assert "step_00000001/manifest.json: missing" in capsys.readouterr().err
