"""Benchmarks: `foldmerge bench mlp` (the FS-Merge paper's MLP tables, measured here).

Every number a benchmark prints is measured by the run that prints it; published values
appear only beside ours, read from a data file that names its table and labelled "paper".
"""
