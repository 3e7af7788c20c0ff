"""python -m t2i_jax.models.pretrained encode|make-tiny ...: see pretrained/cli.py."""

from t2i_jax.models.pretrained.cli import main

main()
