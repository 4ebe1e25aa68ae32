"""Orchestration of a BLISS run (no math): warm-up, then rounds of bilevel -> score -> select -> train -> evaluate.

``rounds`` runs the phases, ``manifest`` records which finished, ``report`` writes JSON/Markdown/plots.
"""
