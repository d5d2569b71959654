"""hataori: a pretraining framework for Japanese decoder-only language models.

Every stage's folder (corpus/, tokenizer/, train/, model/, kernels/, eval/, slurm/) lives inside hataori/, so
neither an install nor a Python started in the repository (whose folder is then on sys.path) has a bare
``kernels``, ``tokenizer`` or ``train`` that could hide the distributions of those names: transformers
imports Hugging Face's ``kernels``.
"""

from setuptools import setup

SUBPACKAGES = ("corpus", "tokenizer", "data", "model", "kernels", "checkpoint", "interop", "train", "eval", "plan",
               "slurm")

setup(
    name="hataori",
    version="0.1.0",
    description="Pretraining framework for Japanese decoder-only language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["hataori", *(f"hataori.{name}" for name in SUBPACKAGES)],
    # The JGLUE files evaluation and the instruction set read offline (CC BY-SA 4.0; hataori/corpus/jglue/README.md
    # and LICENSE go with them).
    package_data={"hataori.corpus": ["jglue/*.json", "jglue/LICENSE", "jglue/README.md"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "omegaconf>=2.3",
        "tensorboard>=2.15",
        # .zst corpora: the standard library reads zstd only from Python 3.14 on.
        "zstandard>=0.22",
        "tqdm>=4.60",
        # SentencePiece model files are protobufs; tokenizer extension and export read and edit them.
        "protobuf>=3.20",
        # Hugging Face export and import: sharded safetensors weights and the fast tokenizer's
        # tokenizer.json, written with the libraries that define those formats.
        "safetensors>=0.4",
        "tokenizers>=0.19",
        # Chat templates are Jinja, as transformers keeps them in tokenizer_config.json; hataori renders them
        # itself (hataori/tokenizer/chat.py) with the library that defines the language.
        "jinja2>=3.1",
    ],
    extras_require={
        # Triton 3.7 is what the kernels are tested with (torch 2.13's CUDA build pins 3.7.1); 3.9's ptxas
        # rejects the sm_90 compile checks, so newer releases wait until they pass.
        "gpu": ["flash-attn>=2.6", "triton>=3.0,<3.8"],
        # Triton runs the kernel tests on the CPU through its interpreter; PEFT loads the exported
        # LoRA adapter onto transformers' Llama in tests/test_lora.py (the independent reference); ruff is
        # the lint tests/test_lint.py runs (ruff.toml); TRL's SFTTrainer and DPOTrainer are the reference the
        # post-training losses, rewards and gradients are checked against (tests/test_trl.py): 1.16 is the API
        # those tests call (labels built from the mask columns, fused_lm_head log-probabilities).
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "build>=1.0", "triton>=3.0,<3.8",
                "peft>=0.11", "ruff>=0.6", "trl>=1.16"],
    },
    entry_points={"console_scripts": ["hataori = hataori.cli:run"]},
)
