"""The stages of a run, one module per stage, named as the stage.

A stage only orchestrates: it reads the artifacts earlier stages left under RUN_DIR
(warm_jax.artifacts names them), calls the flat library, and writes its own artifacts.
Stages never import each other (tests/test_layout.py checks it).
"""
