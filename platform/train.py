"""`python -m platform.train METHOD [options]`: one configuration through the same Tune + MLflow path as a sweep."""

from platform.cli import main

if __name__ == "__main__":
    raise SystemExit(main(single=True))
