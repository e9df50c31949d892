"""blastq.trainer."""
