"""`python -m fleetsync` entry point."""

from fleetsync.cli import main

if __name__ == "__main__":
    main()
