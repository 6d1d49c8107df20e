"""`vitembed show`'s pictures: the numbers behind them (numpy), their drawing (Pillow), and the PNG file.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
