"""`python -m qkv`: the same as the `qkv` command."""

from qkv.cli import run

run()
