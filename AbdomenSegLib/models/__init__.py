"""Model packages: the card schema, cards and the catalog, choosing a model, ensemble and cascade cards, the
network builders and the pure-torch U-Nets.
"""
