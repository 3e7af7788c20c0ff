"""t2i_jax: text-to-image diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="t2i_jax",
    version="0.1.0",
    description="Text-to-image diffusion models (DDPM/DDIM family with guidance) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["t2i_jax", "t2i_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        # jax.typeof, jax.sharding.reshard / AxisType, jax.set_mesh and jax.extend.random
        "jax>=0.7.1",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "ml_collections>=0.1.1",
        "absl-py>=1.0",             # train.py's flags, logging verbosity of the CLIs
        "numpy>=1.26",
        # CheckpointManagerOptions(preservation_policy=checkpoint_managers.LatestN(n)): 0.11.14
        "orbax-checkpoint>=0.11.14",
        # Data: TFDS builders in array_record, read with tfds.data_source + grain (no TensorFlow).
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.6",
        "array-record>=0.7",
        "scikit-learn>=1.3",        # the embedded `digits` images
        "pillow>=10.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",        # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",          # the reproductions' plots
        # Frozen pretrained encoders from local publisher directories (models/pretrained/):
        # weights with numpy (never torch), T5's SentencePiece model, CLIP's BPE.
        "safetensors>=0.4.3",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.19",
    ],
    extras_require={
        # scipy: the Fréchet distance is checked against scipy.linalg.sqrtm; regex: the \p{L} /
        # \p{N} classes of CLIP's word pattern in the reference BPE (tests/np_clip.py), as
        # OpenAI's simple_tokenizer.py (the stdlib re has no Unicode property classes)
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "scipy>=1.10", "regex>=2022.1.18"],
    },
)
