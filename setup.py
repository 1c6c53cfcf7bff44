"""Installs lmindexer_jax, its seqio task registry (`tasks`) and its gin configs."""

import pathlib

import setuptools

_ROOT = pathlib.Path(__file__).parent

# Pinned to a set that resolves together on Python 3.11 (see README, "Versions").
_INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    "absl-py",
    "numpy",
    "scikit-learn==1.9.1",
    "pyarrow==26.0.1",
]

_TEST_REQUIRES = [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "ruff==0.17.6",
    # The CPU wheel lies on the machine; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    # trec_eval, the reference the ranking metrics are tested against (a manylinux wheel).
    "pytrec_eval-terrier==0.5.11",
]


setuptools.setup(
    name="lmindexer_jax",
    version="0.1.0",
    description="LMIndexer (Language Models As Semantic Indexers) in JAX/Flax, t5x style.",
    long_description=(_ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lmindexer_jax*", "tasks*"]) + ["lmindexer_jax.gin"],
    # gin/ sits at the repository root (t5x users look for it there) and installs as
    # lmindexer_jax/gin, which train.py puts on the gin search path: `--gin_file=gin/...`
    # resolves from any directory.
    package_dir={"lmindexer_jax.gin": "gin"},
    package_data={"lmindexer_jax.gin": ["*.gin", "*/*.gin", "*/*/*.gin"]},
    install_requires=_INSTALL_REQUIRES,
    extras_require={"test": _TEST_REQUIRES},
)
