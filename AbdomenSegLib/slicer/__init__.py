"""What the Slicer module needs beyond MRML: its logic, background runs and the engine-worker client, the batch
script's engine, and dependency installation.
"""
