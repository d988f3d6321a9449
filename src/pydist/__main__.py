"""`python -m pydist -p N script.py [args]`."""

from .cli import main

main()
