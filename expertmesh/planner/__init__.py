"""Deployment planning: GPU types, a performance model calibrated by our own benchmarks, and the search over plans
(`expertmesh plan`)."""
