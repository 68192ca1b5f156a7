"""`python -m weightmark` runs the command line."""

from weightmark.cli import main

main()
