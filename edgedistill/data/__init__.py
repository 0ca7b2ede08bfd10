"""Images in: the data sources (a registry), the splits and subsets a recipe cuts from them, the transforms,
and the seeded dataset, sampler and loader that turn a split into batches.

May import ``base`` only.
"""
