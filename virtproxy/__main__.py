"""``python -m virtproxy``: the same command as the ``virtproxy`` console script."""

from virtproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
