"""Write a small LlamaForCausalLM with random weights and a base tokenizer, as a model folder in
transformers' layout: the stand-in for a downloaded Llama in the continued-pretraining recipe.

    python scripts/small_llama.py --tokenizer runs/tokenizer/en-bpe-8k --output models/small-llama
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def write_small_llama(tokenizer: Path, output: Path, *, hidden: int = 128, layers: int = 4, heads: int = 4,
                      kv_heads: int = 2, intermediate: int = 344, max_positions: int = 512, seed: int = 0) -> Path:
    """``output`` with config.json, model.safetensors and the tokenizer's tokenizer.model."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_file = tokenizer / "tokenizer.model" if tokenizer.is_dir() else tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    config = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(output)
    shutil.copyfile(model_file, output / "tokenizer.model")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece tokenizer folder or .model")
    parser.add_argument("--output", type=Path, required=True, help="model folder to write")
    args = parser.parse_args()
    write_small_llama(args.tokenizer, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
