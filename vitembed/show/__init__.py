"""`vitembed show`'s pictures: the numbers behind them (numpy) and their drawing (Pillow); the PNG file is `files.pngfile`.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
