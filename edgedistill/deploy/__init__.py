"""After training: the export targets (a registry, one module each), validating every built file in its own
runtime, what to ship per kind of device, picking a student for a device target, and classifying image files.

May import ``base``, ``data`` and ``models``; it receives the recipe's sections as plain objects.
"""
