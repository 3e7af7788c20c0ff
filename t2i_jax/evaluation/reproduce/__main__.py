"""`python -m t2i_jax.evaluation.reproduce EXPERIMENT ...` (cli.main)."""

import sys

from t2i_jax.evaluation.reproduce.cli import main

sys.exit(main())
