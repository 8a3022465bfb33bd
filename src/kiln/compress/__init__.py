"""Compression: distillation, pruning, quantization and ONNX export, each producing a
new bundle with lineage to its parent, checked against an accuracy tolerance and
measured (size, latency, memory, metric) on this machine."""
