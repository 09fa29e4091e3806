import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: CPU tests run the kernels interpreted
