"""`python -m sparse_dreambooth` (and `accelerate launch -m sparse_dreambooth`) runs the CLI."""

from sparse_dreambooth.cli import main

main()
