"""`python -m platform.sweep METHOD [options]`: sweep a method's hyperparameters (see --help and platform/cli.py)."""

from platform.cli import exit_command, main

if __name__ == "__main__":
    exit_command(main())
