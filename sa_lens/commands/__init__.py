"""Subcommands of ``sa-lens``, one module per stage; each exposes ``register(subparsers)``.

A command's parser sets ``run=fn`` through ``set_defaults``; ``fn(args, parser)`` returns the exit status.
Keeping one module per stage lets the CLI grow without one file owning every option.
"""
