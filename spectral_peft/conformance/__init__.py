"""Conformance: check another implementation of the contract functions against the float64 engine."""
