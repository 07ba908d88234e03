"""Structured pruning of heads and FFN neurons (EarlyBERT): decisions, coefficients, physical shrink."""
