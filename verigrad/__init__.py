"""verigrad: sound certificates on how far a network's gradient explanation can move.

Pipeline: spec → model loading → gradient graph → bound engines → properties/verdicts →
reports → CLI. The public API is re-exported here.
"""
__version__ = "0.1.0"
