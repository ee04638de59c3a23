"""Console scripts of the installed package (pyproject.toml's [project.scripts]).

`ds-longformer-<program> ARGS` runs exactly what `python -m ds_longformer.<program> ARGS` runs (the
module as __main__, so its own entry point, e.g. `cli(main)`, decides how errors end): pretrain,
classify, wikihop, qa, quickstart, convert.
"""

from __future__ import annotations

import runpy

PROGRAMS = ("pretrain", "classify", "wikihop", "qa", "quickstart", "convert")


def _run(program: str) -> None:
    runpy.run_module(f"ds_longformer.{program}", run_name="__main__", alter_sys=True)


def pretrain() -> None:
    _run("pretrain")


def classify() -> None:
    _run("classify")


def wikihop() -> None:
    _run("wikihop")


def qa() -> None:
    _run("qa")


def quickstart() -> None:
    _run("quickstart")


def convert() -> None:
    _run("convert")
