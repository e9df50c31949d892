"""blastq's schema history (Alembic). Run it with `blastq db upgrade` or `blastq.core.adapters.db.upgrade(url)`."""
