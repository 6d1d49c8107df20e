"""A run: the request, the plan (output names, what a resume skips), the one run skeleton, sinks,
the output folder and its manifest, the outcome records and the report.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
