"""``python -m ckptwise`` runs the command line."""

from ckptwise.cli.main import main

main()
