"""blastq.web: the review station (`blastq serve`), a web application over the workers' database and store."""
