"""Model organisms: small, reproducible backdoored models and clean controls.

Used by the tests, the benchmarks and the built-in example. Everything is built locally
from data bdscan generates itself (``synthetic``) or from a BackdoorLLM data folder.
"""
