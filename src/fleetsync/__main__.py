"""`python -m fleetsync` entry point."""

from fleetsync.cli import main

main()
