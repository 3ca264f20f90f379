"""The torch-free simulator: cost model in, trace and metrics out."""

from paci.sim.costs import CostModel, parse_costs
from paci.sim.engine import Simulation, simulate

__all__ = ["CostModel", "Simulation", "parse_costs", "simulate"]
