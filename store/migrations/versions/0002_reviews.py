"""Rounds and review: gates (where a run waits for a person), reviews (their decisions), ratings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "gates",
        sa.Column("run_id", sa.String(length=40), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("deliverable", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "decision"),
    )
    op.create_index(op.f("ix_gates_decision"), "gates", ["decision"], unique=False)
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("deliverable", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("kept", sa.JSON(), nullable=False),
        sa.Column("rejected", sa.JSON(), nullable=False),
        sa.Column("stars", sa.JSON(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_reviews_decision"), "reviews", ["decision"], unique=False)
    op.create_table(
        "ratings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("asset_key", sa.String(length=32), sa.ForeignKey("assets.key"), nullable=False),
        sa.Column("stars", sa.Integer(), nullable=True),
        sa.Column("rejected", sa.Boolean(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_ratings_asset_key"), "ratings", ["asset_key"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_ratings_asset_key"), table_name="ratings")
    op.drop_table("ratings")
    op.drop_index(op.f("ix_reviews_decision"), table_name="reviews")
    op.drop_table("reviews")
    op.drop_index(op.f("ix_gates_decision"), table_name="gates")
    op.drop_table("gates")
