"""The schema's Alembic revisions, oldest first (v0001 is the last release before Alembic).

Each imports SQLAlchemy and Alembic only: a revision is frozen, never the models of today.
"""
