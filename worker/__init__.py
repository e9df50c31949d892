"""blastq.worker: the slide service around core.pipeline.field.

`celery_app` (the Celery app and `run_worker`), `tasks` (`blastq.process_slide`), `resources` (the
engine, store and database each worker process loads once), `submit` (submit, wait, requeue) and
`queries` (the database reads the service commands need).
"""
