"""The continued-pretraining recipe end to end, through the command line on two processes:
a random Llama written by transformers with an English base tokenizer -> ``tokenizer extend`` with
a Japanese tokenizer -> shards -> ``hataori pretrain init.from_hf`` (ZeRO-3) -> ``export hf`` ->
transformers loads and generates.

References: bits per character before continuing (the imported model) against after; the export's
logits against hataori's model from the run's checkpoint; the exported tokenizer's ids against the
run tokenizer's; the provenance against the inputs.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cpu_env

from hataori.cli import main as hataori_main

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
SEQ_LEN = 64


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 200)
def test_import_extend_continue_export_generate(ja_corpus, en_bpe_tokenizer, ja_bpe_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "scripts"))
    from small_llama import write_small_llama

    from hataori.interop.load import load_model
    from hataori.tokenizer.model import Tokenizer

    base_model = write_small_llama(en_bpe_tokenizer, tmp_path / "small-llama", hidden=64, layers=2, heads=4,
                                   kv_heads=2, intermediate=128, max_positions=SEQ_LEN)
    extended = tmp_path / "extended"
    assert hataori_main(["tokenizer", "extend", str(en_bpe_tokenizer), "--add", str(ja_bpe_tokenizer),
                         "--output", str(extended)]) == 0
    sample = tmp_path / "sample.jsonl"
    with open(ja_corpus / "corpus.jsonl", encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, 0, None, 12))
    shards = tmp_path / "shards"
    assert hataori_main(["data", "prepare", "--input", str(sample), "--tokenizer", str(extended), "--output",
                         str(shards), "val_docs=12", "progress=false"]) == 0

    run = tmp_path / "run"
    env = cpu_env(tmp_path / "torch_extensions")
    command = [sys.executable, "-m", "hataori.cli", "pretrain", str(REPO / "configs/train/continue-toy.yaml"),
               f"init.from_hf={base_model}", "--data", str(shards), "--run-dir", str(run), "--nproc", "2",
               f"data.seq_len={SEQ_LEN}", "zero.micro_batch_size=2", f"zero.global_batch_tokens={2 * 2 * SEQ_LEN}",
               "trainer.max_steps=30", "validation.every_steps=30", "checkpoint.every_steps=30",
               "schedule.warmup_steps=3", "validation.max_tokens=3000"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "initial weights from init.from_hf" in result.stdout and "new embedding rows" in result.stdout
    assert not (tmp_path / "torch_extensions").exists()

    vals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "val"]
    assert [v["step"] for v in vals] == [0, 30]
    assert vals[-1]["bpc"] < vals[0]["bpc"] - 0.3, vals  # continuing on Japanese lowers its bits per character
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["init"]["from"] == "hf" and provenance["init"]["vocabulary"]["base"] == 2000
    config = json.loads((base_model / "config.json").read_text())
    assert (provenance["init"]["vocabulary"]["extended"], config["hidden_size"]) == (Tokenizer(extended).vocab_size, 64)

    out = tmp_path / "export"
    assert hataori_main(["export", "hf", str(run), "--output", str(out), "--dtype", "fp32"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, attn_implementation="eager").eval()
    assert model.config.vocab_size == len(tokenizer) == Tokenizer(extended).vocab_size
    prompt = "Debian のパッケージは"
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == [Tokenizer(extended).eos_id] + Tokenizer(extended).encode([prompt])[0]
    ours, _ = load_model(run)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ours(inputs["input_ids"]), rtol=1e-5, atol=1e-5)
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.decode(generated[0], skip_special_tokens=True).startswith(prompt)
    # init.from_run: another run starting from this one gets exactly its weights.
    from hataori.checkpoint.record import model_config, read_config
    from hataori.interop.load import InitConfig, load_initial_weights, open_source

    cfg = model_config(read_config(run))
    plan = open_source(InitConfig(from_run=str(run)), cfg, Tokenizer(extended))
    assert plan.growth is None and plan.describe()["step"] == 30
    restarted = cfg.build()
    load_initial_weights(restarted, plan)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(restarted.state_dict()[name], tensor), name
    card = (out / "README.md").read_text()
    assert "Initial weights: hf" in card and provenance["datasets"][0]["splits"]["train"]["fingerprint"] in card
