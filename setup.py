"""paligemma-jax: PaliGemma and PaliGemma 2 in JAX/Flax."""

import setuptools

setuptools.setup(
    name="paligemma-jax",
    version="0.1.0",
    description="PaliGemma and PaliGemma 2 vision-language models in JAX/Flax, for TPU and GPU.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["paligemma_jax*", "configs*", "checkpoints_convert*"]),
    package_data={"paligemma_jax.serving": ["page.html"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "numpy",
        "ml_dtypes",  # bfloat16 arrays of big_vision .npz files (npz.py).
        "pillow",
        "sentencepiece",
        "protobuf",  # Editing tokenizer.model to add missing <loc>/<seg> tokens.
        "safetensors",
        "huggingface_hub>=2.4",  # Hub ids (hub.py), sharding the transformers export (hf_export.py).
        "ml_collections",
        "absl-py",
        "qwix>=0.1.8",  # int8 / int4 weights: quantization and the quantized products (quantize.py).
        "tqdm",
        "fastapi",  # The HTTP server (python -m paligemma_jax.serve).
        "uvicorn",
        "prometheus-client",
        "httpx",  # The load generator's client (python -m paligemma_jax.serving.loadgen).
    ],
    extras_require={
        # transformers + torch (CPU) are the numerical reference in the tests; peft the LoRA the
        # fine-tuning speed benchmark times against (its test runs it).
        # openai: the server is checked with the client OpenAI users run.
        "test": ["pytest", "pytest-xdist", "transformers==5.23.0", "torch==2.13.0", "peft==0.21.2", "nbclient", "nbformat", "ipykernel",
                 "selenium", "openai"],
    },
)
