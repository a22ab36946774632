"""Gin plumbing shared by `peer_jax.train` and `peer_jax.eval`.

Command lines take `--gin_file=F` (repeatable) and `--gin.NAME=VALUE` bindings (T5X style).
Gin files are found relative to the working directory or the repository root, so
`--gin_file=configs/runs/tiny_cpu.gin` works from anywhere inside a checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tokenize
from collections.abc import Callable
from pathlib import Path

import gin

from peer_jax import cli

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration problem reported as one readable line at start-up."""


def split_gin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pulls `--gin.NAME=VALUE` out of argv; returns (bindings, remaining argv)."""
    bindings, rest = [], []
    for a in argv:
        if a.startswith("--gin."):
            key, sep, value = a[len("--gin."):].partition("=")
            if not sep:
                raise ConfigError(f"{a!r}: write bindings as --gin.NAME=VALUE, e.g. --gin.config.TrainConfig.num_steps=50.")
            bindings.append(f"{key} = {value}")
        else:
            rest.append(a)
    return bindings, rest


def parse(gin_files: list[str], bindings: list[str]) -> None:
    """Parses gin files and bindings, turning gin's failures into ConfigErrors that name the setting."""
    gin.clear_config()
    for p in (Path.cwd(), REPO_ROOT):
        gin.add_config_file_search_path(str(p))
    resolved = []
    for f in gin_files:
        cands = [Path(f), REPO_ROOT / f]
        found = next((c.resolve() for c in cands if c.exists()), None)
        if found is None:
            raise ConfigError(f"--gin_file={f}: no such file (looked in {os.getcwd()} and {REPO_ROOT}).")
        resolved.append(str(found))
    # Includes are tried first as given, relative to the working directory; from outside the
    # checkout with the checkout on PYTHONPATH, gin's package-path reader then crashes on
    # `configs` (a namespace package, no __file__). Parsing from the repository root avoids it.
    cwd = os.getcwd()
    try:
        os.chdir(REPO_ROOT)
        try:
            gin.parse_config_files_and_bindings(resolved, [], finalize_config=False)
        except _GIN_ERRORS as e:
            raise ConfigError(f"gin configuration error in {', '.join(gin_files)}: {cli.first_line(e)}.") from e
        except OSError as e:
            raise ConfigError(f"gin include not found: {e}") from e
        for binding in bindings:  # one at a time, so an error names its binding
            name, _, value = binding.partition(" = ")
            try:
                gin.parse_config(binding)
            except _GIN_ERRORS as e:
                raise ConfigError(
                    f"--gin.{name}={value}: {_reason(e)}. Values are gin/Python literals (strings "
                    "in quotes, e.g. --gin.config.TrainConfig.train_task='\"kjv\"'; tuples in parentheses), and "
                    "names are parameters of a configurable (see configs/base.gin).") from e
    finally:
        os.chdir(cwd)


_GIN_ERRORS = (ValueError, KeyError, ImportError, SyntaxError, TypeError, tokenize.TokenError)


def _reason(e: BaseException) -> str:
    line = cli.first_line(e).rstrip(".")
    if "malformed node" in line or isinstance(e, (SyntaxError, tokenize.TokenError)):
        return "the value is not a gin/Python literal"
    return line


def common_parser(description: str, distributed: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                epilog="Gin bindings: --gin.NAME=VALUE (repeatable), applied after the gin files.")
    p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    if distributed:
        from peer_jax import multihost

        multihost.add_arguments(p)
    return p


def command_line(argv: list[str] | None, description: str,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 distributed: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """(parsed arguments, gin bindings) of a `--gin_file=F --gin.NAME=VALUE ...` command line.

    Raises ConfigError for a malformed binding; argparse exits (status 2) on unknown flags."""
    argv = sys.argv[1:] if argv is None else argv
    bindings, rest = split_gin_args(argv)
    parser = common_parser(description, distributed)
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args(rest), bindings
