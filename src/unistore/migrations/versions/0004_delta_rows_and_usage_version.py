"""Delta-cache rows and dataset-usage versions.

Adds ``delta_embedding_cache.row_index``: a delta cache keeps many deltas as
rows of one array per write (one store per batch of checkpoints, not one per
delta), so an entry names its store, array and row.  Adds
``dataset_usage.version``: the dataset version an experiment used, queryable
without reading the JSON details.  Both columns are nullable; existing rows
keep their meaning (an entry without a row index is a whole array, or inline).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delta_embedding_cache", schema=None) as batch_op:
        batch_op.add_column(sa.Column("row_index", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("dataset_usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dataset_usage", schema=None) as batch_op:
        batch_op.drop_column("version")
    with op.batch_alter_table("delta_embedding_cache", schema=None) as batch_op:
        batch_op.drop_column("row_index")
