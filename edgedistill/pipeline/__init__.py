"""One run: the run folder and its markers, the stage table, the context every stage receives, the planner's
measurements, the stages themselves, the report, and the driver that runs them in order.

May import every capability package; only ``edgedistill.cli`` imports it.
"""
