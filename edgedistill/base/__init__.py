"""The ground floor: what every capability uses and none owns — exit codes and errors, registries, atomic file
writes, the console, plots, timing on a shared machine, devices and precision, and the torch.distributed helpers.

Imports nothing of the package outside ``base``; its modules are small and pure where they can be.
"""
