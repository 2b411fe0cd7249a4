"""The result check: anatomy and confidence notes on a segmentation, its pictures, and qc.json/qc.csv."""
