"""Moved to ``pipeline_ir.py`` (actions, schedules, the communication pass) and
``simulator.py``; this re-export goes once ``mpnn.train`` imports from there."""

from .pipeline_ir import SCHEDULES  # noqa: F401
