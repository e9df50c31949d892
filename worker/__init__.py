"""blastq.worker."""
