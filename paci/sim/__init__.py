"""The torch-free simulator: cost model in, trace and metrics out."""

from paci.sim.costs import CostModel, parse_costs
from paci.sim.engine import Simulation, check_size, simulate

__all__ = ["CostModel", "Simulation", "check_size", "parse_costs", "simulate"]
