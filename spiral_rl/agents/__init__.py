"""Agents of the loop: the PlanAgent (think) and the CriticAgent (reflect)."""
