"""`python -m lorakit` (and `torchrun -m lorakit`) runs the command line."""

from .cli import main

main()
