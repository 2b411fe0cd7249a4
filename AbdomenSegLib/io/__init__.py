"""Reading and writing images (NIfTI, NRRD, MHA, DICOM series and SEG), file integrity, atomic outputs, tables,
the read-ahead of a folder run and the synthetic phantom.
"""
