"""Load an exported model folder with transformers, offline, and continue a prompt.

    python scripts/hf_generate.py runs/continue-hf "Debian のパッケージは" --max-new-tokens 40
"""

from __future__ import annotations

import argparse


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (hataori export hf)")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8, top_k=40)
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
