"""warm-jax: weight-averaged reward models (WARM) and KL-regularised RLHF in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "numpy>=1.26",
    "gin-config>=0.5",
    "ml-collections>=1.0",
]
DATA = [
    "seqio>=0.0.20",
    "tensorflow>=2.21",
    "tensorflow-text>=2.21",
    "tensorflow-datasets>=4.9",
    "sentencepiece>=0.2",
    "tokenizers>=0.20",  # Hugging Face tokenizer.json vocabularies
]
REPORT = ["matplotlib>=3.8", "tensorboardX>=2.6"]
# libtpu at the version the locked jax's own `tpu` extra pins (jax 0.10.2: libtpu==0.0.42.*;
# ~200 MB download, ~680 MB installed; tests/test_aot.py checks the two agree). On a TPU VM
# it runs the programs; on any other host it lets `python -m warm_jax.aot` compile them for
# a TPU topology. Not in requirements.lock: the default install and CI stay without it
# (tests/test_aot.py then skips its compile tests and says why).
TPU = ["libtpu==0.0.42.*", "requests"]
DEV = ["pytest>=8", "pytest-xdist>=3.8", "hypothesis>=6", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"]

setup(
    name="warm_jax",
    version="0.1.0",
    description="Weight averaged reward models (WARM) and KL-regularised RL in JAX/Flax",
    packages=find_packages(include=["warm_jax", "warm_jax.*"]),
    package_data={"warm_jax": ["csrc/*.cc", "csrc/*.h"]},  # the CPU kernels, built on use
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "report": REPORT,
        "dev": DEV,
        "tpu": TPU,
        "all": DATA + REPORT + DEV,
    },
    entry_points={"console_scripts": ["warm-jax=warm_jax.main:console_main"]},
)
