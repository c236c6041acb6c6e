"""How well do index folders retrieve? `python -m evaluation`: mAP on revisited Oxford/Paris, copy
detection and labelled collections, answered by the app's own search.

Not part of building an index: this package uses `dino_demo` and `index_builder.source`, and
neither of them imports it.
"""
