"""Training a network from a teacher: energy scores and groups, the losses (a registry: a divergence times a
temperature policy), HE-DA mixing, the objectives a step optimises, the teacher in its fastest faithful runtime,
the teacher-logit cache, and the one training loop.

May import ``base``, ``data`` and ``models``; it knows no recipe class, no run folder and no stage.
"""
