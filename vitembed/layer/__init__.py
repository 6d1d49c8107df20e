"""The input layer itself: its configuration and presets, the torch reference of its five steps,
the numpy engine (`kernel`), position tables and resolution. Knows nothing of files or runs.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
