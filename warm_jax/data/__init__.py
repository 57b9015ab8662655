"""TL;DR data: readers of the public formats, the miniature world, arrays and SeqIO tasks.

Modules (only ``tfds_builder``, ``tasks`` and ``seqio_provider`` import TensorFlow / seqio):

* ``formats``: comparison and SFT readers with file/line/field errors; label corruption.
* ``lexicon``, ``world``: the seeded miniature TL;DR world (``python -m warm_jax.data.world``).
* ``oracle``: the world's programmatic reward (labeler and control reward).
* ``diagnostics``: oracle / length / bag-of-words accuracies in and out of distribution.
* ``vocab``: SentencePiece vocabulary with T5/seqio ids.
* ``pipeline``: numpy arrays for training and sampling; resumable batches.
* ``provider``: DataConfig, DataSource (files or a SeqIO task, per stage), DataProvider.
* ``tfds_builder``, ``tasks``: TFDS builder over local files; SeqIO tasks, feature converters.
* ``seqio_provider``: a stage's data from a SeqIO task or mixture (docs/seqio.md).
"""
