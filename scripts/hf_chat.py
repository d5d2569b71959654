"""Chat with an exported fine-tuned model in transformers, offline: its own chat template renders the
conversation (apply_chat_template) and generate stops where an assistant turn ends.

    python scripts/hf_chat.py models/sft-toy "日本の首都はどこですか？" [--max-new-tokens 40] [--greedy]
"""

from __future__ import annotations

import argparse


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (hataori export hf of a `hataori sft` run)")
    parser.add_argument("message", help="the user's turn")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if not tokenizer.chat_template:
        raise SystemExit(f"{args.model} has no chat template: export a run fine-tuned with `hataori sft`")
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": args.message}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": False} if args.greedy else {"do_sample": True, "temperature": 0.7, "top_k": 40}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
    reply = output[0, inputs["input_ids"].shape[1]:]
    print(tokenizer.decode(reply, skip_special_tokens=True).replace("<|im_end|>", ""))


if __name__ == "__main__":
    main()
