"""clip_jax: contrastive language-image pretraining (CLIP) in JAX/Flax at TPU-pod scale.

The import name is `clip_jax`; the distribution is `clip-jax-train` (PyPI's `clip-jax` is an
unrelated project).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "clip_jax/__init__.py").read_text()).group(
    1
)

# python -m clip_jax.aot compiles for TPU topologies with libtpu, on a machine without TPUs. Its
# wheels (137 MB, 484 MB installed) are for Linux on x86-64 and Python 3.11+; 0.0.52 is
# one this checkout compiles with on jax 0.10.2 (v4, v5e, v5p and v6e checked).
AOT = [
    "libtpu==0.0.52; sys_platform == 'linux' and platform_machine == 'x86_64' "
    "and python_version >= '3.11'"
]

setup(
    name="clip-jax-train",
    version=VERSION,
    description="Contrastive language-image pretraining (CLIP) in JAX/Flax, CPU to TPU pod",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["clip_jax", "clip_jax.*"]),
    package_data={
        "clip_jax.data": ["bpe_simple_vocab_16e6.txt.gz", "BPE_LICENSE.txt"],
        "clip_jax.evals": ["prompt_data/*.json", "prompt_data/*.txt", "prompt_data/README.md"],
    },
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorflow-datasets>=4.9.7,<5",
        "sentencepiece>=0.2,<0.3",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "etils[epath]>=1.7",  # the path layer (clip_jax.infra.paths), as orbax uses it
        "tensorboardX>=2.6,<3",
        "safetensors>=0.4.3,<1",
        "huggingface_hub>=0.26,<3",  # Hub downloads, in the cache open_clip and timm share
        "tokenizers>=0.15,<1",  # the SigLIP tags' tokenizer.json files
        "numpy>=1.26,<3",
        "ftfy>=6.1,<7",
        "regex>=2023.0",
        "pillow>=10",
        "matplotlib>=3.7",
    ],
    extras_require={
        # gcsfs and the storage emulator: the gs:// workdir test, on a fake server; libtpu: the
        # test of python -m clip_jax.aot.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "scikit-learn>=1.4",
            "gcsfs>=2024.2",
            "gcp-storage-emulator>=2024.8",
            *AOT,
        ],
        "aot": AOT,
        # The handwritten-digits demo dataset ships inside scikit-learn.
        "demo": ["scikit-learn>=1.4"],
        # The reference implementations, for the parity tests (they skip without them): open_clip,
        # and CLIP_benchmark's exporter and zero-shot code with what they import; timm (open_clip's
        # SigLIP image towers) and transformers (the tokenizers of its SigLIP configs).
        "reference": [
            "torch>=2.4",
            "torchvision",
            "open_clip_torch>=2.26",
            "timm>=1.0",
            "transformers>=4.40",
            "clip-benchmark>=1.6",
            "webdataset>=0.2.31",
            "requests",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
