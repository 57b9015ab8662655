"""warm-jax: weight averaged reward models (WARM) and KL-regularised RLHF in JAX/Flax.

The core (model, partitioning, optimisation, checkpoints, averaging) imports without
TensorFlow or seqio; the data pipeline's SeqIO/TFDS parts need the `data` extra.
"""
__version__ = "0.1.0"
