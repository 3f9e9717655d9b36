"""``python -m agriseg`` is the ``agriseg`` command."""

from agriseg.cli import entry_point

if __name__ == "__main__":
    entry_point()
