"""Images in: what to encode (files, folders, lists, URIs), and an image file -> uint8 pixels of
the layer's size (Pillow, or nvJPEG on a CUDA device).

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
