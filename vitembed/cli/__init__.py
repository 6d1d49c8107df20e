"""The `vitembed` command line: the Typer app, its shared options, `show`'s commands, and start-up.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
