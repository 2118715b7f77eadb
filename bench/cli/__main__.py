"""`python -m bench.cli`: the `bench` command."""

from bench.cli import main

if __name__ == "__main__":
    main()
