"""Side-by-side serving benchmark: in-process onnxruntime, a bare gRPC floor, sluice, MLServer, PyTriton.

Run ``python -m bench --help`` (or ``python bench/run.py --help``); see bench/README.md.
"""
