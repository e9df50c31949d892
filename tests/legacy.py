"""What older blastq databases looked like, for the tests that upgrade them."""

from __future__ import annotations

CELL_TYPES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "blast")

# (table, column) pairs revision 0004 added: drop them from today's tables to get an older layout.
COLUMNS_OF_0004 = (
    [("results", c) for c in ("differential", "review_cells", "classifier_version")]
    + [("cells", c) for c in ("cell_type", "cell_type_probability", "review")]
    + [("cells", f"p_{t}") for t in CELL_TYPES]
)

# (table, column) pairs revision 0005 added to the tables that existed before it.
COLUMNS_OF_0005 = [("results", "verdict"), ("results", "min_white_cells"), ("cells", "review_reason")]
