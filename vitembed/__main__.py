"""`python -m vitembed`."""

from vitembed.cli import main

if __name__ == "__main__":
    main()
