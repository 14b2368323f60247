"""`aidc`, the command line: thin, each subcommand calls the library.

main.py      the parser and the data, model, tune, cluster and plan commands
offline.py   aidc model export / compare
security.py  aidc keys, aidc audit, aidc model verify
ops.py       aidc status (status.py: the screen it renders)
"""

from aidc.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
