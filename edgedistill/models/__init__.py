"""Networks: the student registry, the teacher sources, reading checkpoints, counting parameters and MACs,
and exporting a network to one checked ONNX file (the exporter every other capability shares).

May import ``base`` and ``data`` (the preprocessing an exported file records).
"""
