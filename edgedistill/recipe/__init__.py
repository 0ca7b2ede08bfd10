"""The recipe: one typed, validated tree (pydantic) read from YAML and ``--set`` overrides, the one place where
values are checked. Imports no torch when it loads; its validators look names up in the registries of ``data``,
``models``, ``distill`` and ``deploy`` when a recipe is checked.

May import ``base`` and, inside its validators, the registries below it; nothing below imports it.
"""
