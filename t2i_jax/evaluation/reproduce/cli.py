"""`python -m t2i_jax.evaluation.reproduce EXPERIMENT --workdir DIR ...`: one subcommand per
reproduction (registry.EXPERIMENTS), each with its own flags, run behind the error boundary."""

from __future__ import annotations

import argparse
import os
import sys

from t2i_jax import files
from t2i_jax.errors import ArgumentParser, Boundary
from t2i_jax.evaluation import reproduce
from t2i_jax.evaluation.reproduce.registry import EXPERIMENTS

PROG = "python -m t2i_jax.evaluation.reproduce"


def _first_paragraph(doc: str) -> str:
    return " ".join((doc or "").split("\n\n")[0].split())


def parser() -> tuple:
    """(the parser, {experiment: its subparser})."""
    p = ArgumentParser(prog=PROG, description=_first_paragraph(reproduce.__doc__),
                       epilog=f"{PROG} EXPERIMENT --help: the flags of one experiment.")
    subs = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True,
                            parser_class=ArgumentParser)
    by_name = {}
    for name, module in EXPERIMENTS.items():
        by_name[name] = subs.add_parser(name, help=module.SUMMARY,
                                        description=module.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(by_name[name])
    return p, by_name


def main(argv=None) -> int:
    p, subs = parser()
    a, unknown = p.parse_known_args(argv)
    sub = subs[a.experiment]
    if unknown:  # a flag of another experiment, or of none
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    experiment = EXPERIMENTS[a.experiment]
    experiment.check_arguments(sub, a)
    a.out = a.out or os.path.join(a.workdir, "reproduce", a.experiment)
    try:
        a.out = files.check_writable_dir(files.check_output_dir(a.out, "--out"), "--out")
    except ValueError as e:
        sub.error(str(e))
    boundary = Boundary("reproduce", interrupted=(
        f"interrupted: the finished sampling shards under {a.out} are kept; rerun the same "
        "command to go on."))
    boundary.log_in(a.out)
    return boundary.run(experiment.run, a)


if __name__ == "__main__":
    sys.exit(main())
