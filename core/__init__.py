"""blastq.core: the image path (slide -> preprocess -> tiles -> engine -> stitch -> cells -> stats).

Pure functions on numpy arrays and frozen dataclasses; no service libraries here except in the
adapter modules (db, store, settings).
"""
