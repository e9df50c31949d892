"""blastq.cli."""
