"""The rewrite: ``layouts`` (what a cut does to each tensor), ``sites`` (one planner per kind of site),
``rewriter`` (check every edit, then commit them all), ``export`` (back to a checked model)."""

from .export import check_model, dead_nodes, export
from .rewriter import Rewriter, check_cut

__all__ = ["Rewriter", "check_cut", "check_model", "dead_nodes", "export"]
