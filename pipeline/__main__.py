"""`python -m pipeline`: the same command line as the `actcache` console script."""

from pipeline.cli import console

console()
