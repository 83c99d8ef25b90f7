"""`python -m platform.train METHOD [options]`: one configuration through the same Tune + MLflow path as a sweep."""

from platform.cli import exit_command, main

if __name__ == "__main__":
    exit_command(main(single=True))
