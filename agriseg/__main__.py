"""``python -m agriseg`` is the ``agriseg`` command."""

from agriseg.cli import main

if __name__ == "__main__":
    main()
