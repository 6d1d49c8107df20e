"""Weights in and out: vitembed's layer files, other libraries' checkpoints and their layouts,
named pretrained weights, and the cache of random layers.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
