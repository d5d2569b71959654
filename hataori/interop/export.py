"""``hataori export hf``: a run's checkpoint as a model folder that transformers loads offline.

    hataori export hf RUN --output DIR [--replace] [--step N] [--dtype bf16|fp16|fp32]
        [--max-shard-size 2GB] [--tokenizer PATH] [--adapter ADIR]

RUN is a run folder (its latest complete checkpoint, or ``--step N``) or one of its
``checkpoints/step_N`` folders, from any ZeRO stage. A LoRA run's export is the merged model: its
base (the run's init source, checked against the fingerprint its checkpoint recorded) with the
adapters folded in (:class:`hataori.checkpoint.states.LoRAWeights`); with ``--adapter ADIR``, DIR
receives the unmerged base instead and ADIR the adapter in PEFT's layout (``adapter_config.json``,
``adapter_model.safetensors``), which ``PeftModel.from_pretrained`` loads onto DIR's model. DIR receives:

* ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``: the weights in
  transformers' Llama layout (:mod:`hataori.interop.hf`), read from the checkpoint one tensor at a
  time (:mod:`hataori.checkpoint.states`, fp32 master weights where there are any) and written shard
  by shard, so export holds about one shard in memory beyond the tensor it is reading;
* ``config.json`` (``LlamaForCausalLM``) and ``generation_config.json`` with the tokenizer's
  BOS, EOS and pad ids;
* ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json``: the run's SentencePiece
  model and the fast tokenizer that gives the same ids (:mod:`hataori.tokenizer.hf`); for a
  fine-tuning run also its chat template (``chat_template``, so that ``apply_chat_template`` gives
  the ids it trained on), and in ``generation_config.json`` the piece that ends an assistant turn
  beside EOS (``<|im_end|>`` for the ChatML preset);
* ``README.md``: a model card with the architecture, parameters, steps, tokens seen, the final
  validation bits per character, and the run's data provenance (``provenance.json``: the shards'
  fingerprints, the corpora they were built from with package versions, licenses and counts, the
  tokenizer's fingerprint).

The tokenizer (the run's, or ``--tokenizer``) must be the one the run was trained with: its
fingerprint is checked against the run's record (:func:`hataori.checkpoint.record.run_tokenizer`).

DIR and ADIR are outputs under :mod:`hataori.outputs`' contract: held by one export at a time, written
under a temporary name and renamed when complete, marked as an export (or an adapter). A non-empty one
is refused unless ``--replace`` is given and it holds an earlier output of the same kind, which then
stays until the new one is complete; a folder that is or holds the run, its tokenizer or a LoRA run's
base, a run folder, a model hataori did not export and any other folder are refused either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hataori import __version__
from hataori.checkpoint.layout import CONFIG_FILE, METRICS_FILE, PROVENANCE_FILE
from hataori.errors import ConfigError, InputError
from hataori.fsutil import atomic_write_text
from hataori.outputs import Output, claim
from hataori.tokenizer.hf import exact, write_hf_tokenizer
from hataori.tokenizer.proto import model_type_name, parse

if TYPE_CHECKING:  # torch and the model code load when an export runs (see export_hf)
    from hataori.interop.load import OpenRun

DTYPES = ("bf16", "fp16", "fp32")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size such as ``2GB``, ``500MB`` or ``1048576``."""
    match = SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError("max-shard-size", f"{text!r} is not a size; write e.g. 2GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()])


def export_hf(run: str | Path, output: str | Path, *, step: int | None = None, dtype: str = "bf16",
              max_shard_bytes: int = 2 * 2**30, tokenizer: str | None = None, replace: bool = False,
              adapter: str | Path | None = None) -> dict[str, Any]:
    """Write the Hugging Face folder of a run's checkpoint (see the module docstring); a summary.
    With ``adapter`` (a LoRA run) ``output`` gets the frozen base and ``adapter`` the PEFT adapter."""
    # torch and the model code load in ~1.3 s: when an export runs, not for `hataori export hf --help`
    from hataori.interop import hf
    from hataori.interop.load import open_run

    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = hf.DTYPES[dtype]
    output = Path(output)
    if adapter is not None:
        adapter = Path(adapter)
        apart = (adapter.resolve(), output.resolve())
        if apart[0] == apart[1] or apart[0].is_relative_to(apart[1]) or apart[1].is_relative_to(apart[0]):
            raise ConfigError("--adapter", "must be a folder apart from --output (neither inside the other): "
                              "--output receives the base model")
    opened = open_run(run, step)
    run_dir, config = opened.run_dir, opened.config
    init = config.get("init") or {}
    # What the export reads: the run, its tokenizer and a LoRA run's base. None of them may be replaced.
    inputs = [run_dir, *(p for p in (tokenizer, config.get("tokenizer"), init.get("from_hf"), init.get("from_run"))
                         if p)]
    with contextlib.ExitStack() as held:
        out = held.enter_context(claim(output, "hf-model", inputs=inputs))
        out.check_replace(replace)
        ad = None
        if adapter is not None:
            ad = held.enter_context(claim(adapter, "peft-adapter", option="--adapter", inputs=inputs))
            ad.check_replace(replace)
        return _export(opened, out, ad, started=started, dtype=dtype, torch_dtype=torch_dtype,
                       max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)


def _export(run: OpenRun, out: Output, ad: Output | None, *, started: float,
            dtype: str, torch_dtype, max_shard_bytes: int, tokenizer: str | None) -> dict[str, Any]:
    """export_hf's work, with its outputs held."""
    import torch  # torch and the model code: see export_hf

    from hataori.interop import hf
    from hataori.interop.load import LoRAWeights, check_finite

    output, adapter = out.path, None if ad is None else ad.path
    run_dir, checkpoint, config, cfg = run.run_dir, run.checkpoint, run.config, run.model_config
    if cfg.qk_norm:
        raise InputError(run_dir / CONFIG_FILE, "model.qk_norm: a model with qk-norm has no Llama equivalent in "
                         "transformers and cannot be exported")
    tok = run.tokenizer(tokenizer)
    weights = run.weights(tok)
    lora = isinstance(weights, LoRAWeights)
    if adapter is not None and not lora:
        raise ConfigError("--adapter", f"the run {run_dir} trained no LoRA adapters (its config.yaml has no lora "
                          "section); export it without --adapter")
    names = hf.hf_names(cfg)
    expected = {name: shape for name, shape in cfg.weight_shapes().items() if name in names}  # run_weights checked

    theirs = {their: ours for ours, their in names.items()}
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    sizes = [(their, itemsize * math.prod(hf.hf_shape(cfg, ours, expected[ours]))) for ours, their in names.items()]

    def tensor(their: str):
        ours = theirs[their]
        value = weights.base_tensor(ours) if adapter is not None else weights.tensor(ours)
        check_finite(value, ours, checkpoint, "this checkpoint is not healthy: export an earlier one (--step N)")
        return hf.to_hf_tensor(cfg, ours, value).to(torch_dtype)

    with out.folder() as tmp:
        index = hf.write_safetensors(tmp, hf.plan_shards(sizes, max_shard_bytes), tensor)
        special = {"bos_id": _id(tok.bos_id), "eos_id": _id(tok.eos_id), "pad_id": _id(tok.pad_id)}
        config_json = hf.hf_config(cfg, dtype=torch_dtype, **special)
        atomic_write_text(tmp / hf.CONFIG_FILE, json.dumps(config_json, indent=2) + "\n")
        template = run.chat_template()
        stops = [] if template is None else [i for i in template.stop_ids(tok) if i != special["eos_id"]]
        generation = {"bos_token_id": special["bos_id"],
                      "eos_token_id": [special["eos_id"], *stops] if stops else special["eos_id"],
                      "pad_token_id": special["pad_id"]}
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        write_hf_tokenizer(tok, tmp, model_max_length=cfg.max_seq_len,
                           chat_template=None if template is None else template.source)
        card = model_card(run_dir, checkpoint, config, cfg, tok, weights.client_state, dtype=dtype,
                          lora=None if not lora else ("base" if adapter is not None else "merged"))
        atomic_write_text(tmp / "README.md", card)
    if ad is not None:
        write_adapter(weights, ad, base=output, dtype=torch_dtype, checkpoint=checkpoint)
    return {
        "output": str(output), "run": str(run_dir), "checkpoint": str(checkpoint), "dtype": dtype,
        "shards": len(set(index["weight_map"].values())), "bytes": index["metadata"]["total_size"],
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "tokenizer_exact": exact(tok),
        "lora": None if not lora else ("base" if adapter is not None else "merged"),
        "adapter": None if adapter is None else str(adapter),
    }


def write_adapter(weights, folder: Output, *, base: Path, dtype, checkpoint: Path) -> None:
    """The PEFT adapter of a LoRA run (``adapter_config.json``, ``adapter_model.safetensors``) into the
    held output ``folder``, written under a temporary name; its ``base_model_name_or_path`` is ``base``."""
    from safetensors.torch import save_file

    from hataori.interop.load import check_finite
    from hataori.interop.peft import peft_config, peft_state_dict  # torch: see export_hf

    def value(name: str):
        if name.endswith((".lora_A", ".lora_B")):
            a, b = weights.adapter(name.rpartition(".")[0])
            return a if name.endswith(".lora_A") else b
        return weights.tensor(name)  # a train_also module's weight, as trained

    state = {key: check_finite(t, key, checkpoint, "this checkpoint is not healthy: export an earlier one (--step N)")
             .to(dtype).contiguous() for key, t in peft_state_dict(weights.model, weights.lora, value).items()}
    config = peft_config(weights.model, weights.lora, base_model_name_or_path=str(Path(base).resolve()))
    with folder.folder() as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def _id(value: int) -> int | None:
    return value if value >= 0 else None


# ----------------------------------------------------------------------------- model card


def final_validation(run_dir: Path, step: int | None) -> dict | None:
    """The last validation record at or before ``step`` in the run's metrics.jsonl."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("kind") == "val" and (step is None or record["step"] <= step):
            found = record
    return found


def model_card(run_dir: Path, checkpoint: Path, config: dict, cfg, tok, client_state: dict, *, dtype: str,
               lora: str | None = None) -> str:
    """The README.md of an export: what the model is, how it was trained, and from what data. ``lora``:
    ``merged`` (a LoRA run's adapters folded in) or ``base`` (its frozen base, the adapter beside)."""
    step = client_state.get("step")
    tokens = client_state.get("tokens_seen")
    val = final_validation(run_dir, step)
    provenance_path = run_dir / PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text(encoding="utf-8")) if provenance_path.is_file() else None
    zero = config.get("zero", {})
    vocab_padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    lines = [
        "---", "library_name: transformers", "language: [ja]", "tags: [hataori, llama]", "---", "",
        f"# {run_dir.name}", "",
        f"A Llama-style decoder-only language model trained with hataori {__version__}, exported from "
        f"`{checkpoint}` in {dtype}.", "",
        *([f"The run trained LoRA adapters (rank {config['lora'].get('rank')}) on a frozen base; "
           + ("they are folded into these weights." if lora == "merged" else
              "these are the base's weights, and the adapter was exported beside them in PEFT's layout."), ""]
          if lora else []),
        "## Architecture", "",
        "| | |", "|---|---|",
        f"| parameters | {cfg.num_params() - vocab_padding:,} |",
        f"| layers, width, MLP width | {cfg.n_layers}, {cfg.d_model}, {cfg.ffn_hidden} |",
        f"| attention heads (key/value heads), head width | {cfg.n_heads} ({cfg.n_kv_heads}), {cfg.head_dim} |",
        f"| vocabulary | {cfg.vocab_size:,} |",
        f"| context, rotary base | {cfg.max_seq_len:,}, {cfg.rope_base:g} |",
        f"| tied embeddings | {'yes' if cfg.tie_embeddings else 'no'} |", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| optimizer steps | {step if step is not None else 'unknown'} |",
        f"| tokens seen | {f'{tokens:,}' if tokens is not None else 'unknown'} |",
        f"| processes, precision, ZeRO stage | {client_state.get('world_size', '?')}, {zero.get('precision', '?')}, "
        f"{zero.get('stage', '?')} |",
        f"| sequence length | {config.get('data', {}).get('seq_len', '?')} |",
    ]
    if val is not None:
        lines.append(f"| validation at step {val['step']} | {val['bpc']:.4f} bits per character, "
                     f"loss {val['loss']:.4f} "
                     f"({val.get('documents', '?')} documents, {val.get('chars', 0):,} characters) |")
    else:
        lines.append("| validation | none recorded |")
    lines += ["", "## Tokenizer", "",
              f"SentencePiece {_model_type(tok)} with {tok.vocab_size:,} pieces, fingerprint `{tok.fingerprint}` "
              f"(`tokenizer.model`); `tokenizer.json` gives the same ids. Documents were trained on as they "
              f"follow the end-of-document token `{tok.sp.id_to_piece(tok.eos_id)}`, and the tokenizer puts it "
              "before a text when `add_special_tokens=True`.", ""]
    lines += _provenance_lines(provenance)
    lines += ["## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "inputs = tokenizer(\"日本語の文章\", return_tensors=\"pt\")",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0], skip_special_tokens=True))",
              "```", ""]
    return "\n".join(lines)


def _model_type(tok) -> str:
    return model_type_name(parse(tok.proto, tok.path))


def _provenance_lines(provenance: dict | None) -> list[str]:
    if provenance is None:
        return ["## Data", "", "This run recorded no provenance.json (it predates the record).", ""]
    lines = ["## Data", ""]
    init = provenance.get("init", {})
    if init.get("from") != "random":
        lines += [f"Initial weights: {init.get('from')} `{init.get('path', '')}`"
                  + (f" (config SHA-256 `{init['config_sha256'][:16]}`)" if init.get("config_sha256") else "")
                  + ".", ""]
    for dataset in provenance.get("datasets", []):
        splits = dataset.get("splits", {})
        counts = ", ".join(f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
                           f"fingerprint `{s['fingerprint']}`"
                           for name, s in splits.items())
        lines += [f"### `{dataset['path']}` (weight {dataset['weight']:g})", "", counts + ".", ""]
        for source in dataset.get("sources", []):
            lines.append(f"- source `{source.get('path')}`: {source.get('documents', '?')} documents")
        for path, corpus in dataset.get("corpora", {}).items():
            packages = corpus.get("packages") or ([corpus["package"]] if "package" in corpus else [])
            lines += ["", f"Corpus manifest `{path}`:", "", "| package | version | licenses | documents | characters |",
                      "|---|---|---|---|---|"]
            for package in packages:
                counts = package.get("counts", {})
                lines.append(f"| {package.get('name')} | {package.get('version')} | "
                             f"{', '.join(package.get('licenses', []))} | {counts.get('documents', '?')} | "
                             f"{counts.get('chars', '?')} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder or its checkpoints/step_N folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="the model folder to write")
    parser.add_argument("--replace", action="store_true", help="replace an earlier export in DIR")
    parser.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest complete one)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="precision of the exported weights")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--tokenizer", help="tokenizer folder or .model file (default: the run's)")
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA run: write its adapter in PEFT's layout to DIR and "
                                                         "the frozen base (not the merged model) to --output")


def main(args: argparse.Namespace) -> int:
    summary = export_hf(args.run, args.output, step=args.step, dtype=args.dtype,
                        max_shard_bytes=parse_size(args.max_shard_size), tokenizer=args.tokenizer,
                        replace=args.replace, adapter=args.adapter)
    print(f"exported {summary['checkpoint']} to {summary['output']}: {summary['shards']} shard(s), "
          f"{summary['bytes'] / 2**20:,.1f} MiB of {summary['dtype']} weights, {summary['seconds']:.1f} s, "
          f"peak resident memory {summary['peak_rss_gib']:.2f} GiB")
    if summary["lora"] == "merged":
        print("the run's LoRA adapters are folded into the exported weights (--adapter DIR exports them apart)")
    elif summary["lora"] == "base":
        print(f"the frozen base is in {summary['output']}, the PEFT adapter in {summary['adapter']}")
    if not summary["tokenizer_exact"]:
        print("note: the tokenizer is a unigram model with scores off the 1/64 grid: tokenizer.json may give "
              "other ids than SentencePiece where two segmentations tie (see hataori.tokenizer.proto)")
    return 0
