"""Where a run's tasks execute: the local decoder-process pool and its worker side, and Ray actors.
Executors know nothing of outputs: the run skeleton plans, records and reports.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
