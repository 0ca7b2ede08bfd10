"""The compute budget of HE-DA, as pure functions with no torch: the cost model of an epoch at fraction r, the
one search for the largest r that fits, and the closed-loop controller that re-chooses r while training on a
clock it is given.

Imports nothing of the package outside ``budget``; what it needs to know arrives as numbers.
"""
