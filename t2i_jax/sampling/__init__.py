"""Sampling: stages of trained models chained into one resumable, sharded job.

request.py (what a user asks: sample.py's flags) -> planner.py (models loaded and checked) ->
plan.py (the stages with their inputs) -> job.py (running it) over outdir.py (the files) and
spec.py (the job's identity); generate.py is one stage's compiled chain, guides.py the gradient
guides, best_of.py the selection among candidates. Importing the package loads no jax, so
sample.py refuses bad flags before the backends start.
"""
