"""Folders of cases: the per-case runner that the command line and Dask workers share, the input listing, the
manifest and the Dask cluster path.
"""
