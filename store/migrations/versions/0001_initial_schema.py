"""Initial schema: the lineage store as of atelier 0.1 (runs, assets, edges, run_assets, scores, stage_runs).

Revision ID: 0001
Revises: 
Create Date: 2026-11-27

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('runs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('campaign', sa.String(length=64), nullable=False),
    sa.Column('brief_path', sa.Text(), nullable=False),
    sa.Column('brief_sha256', sa.String(length=64), nullable=False),
    sa.Column('profile', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_runs_campaign'), 'runs', ['campaign'], unique=False)
    op.create_table('assets',
    sa.Column('key', sa.String(length=32), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('campaign', sa.String(length=64), nullable=False),
    sa.Column('deliverable', sa.String(length=64), nullable=True),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('model', sa.JSON(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_index(op.f('ix_assets_campaign'), 'assets', ['campaign'], unique=False)
    op.create_index(op.f('ix_assets_deliverable'), 'assets', ['deliverable'], unique=False)
    op.create_index(op.f('ix_assets_sha256'), 'assets', ['sha256'], unique=False)
    op.create_index(op.f('ix_assets_stage'), 'assets', ['stage'], unique=False)
    op.create_table('stage_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('deliverable', sa.String(length=64), nullable=True),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('computed', sa.Integer(), nullable=False),
    sa.Column('reused', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_stage_runs_run_id'), 'stage_runs', ['run_id'], unique=False)
    op.create_table('edges',
    sa.Column('child', sa.String(length=32), nullable=False),
    sa.Column('parent', sa.String(length=32), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['child'], ['assets.key'], ),
    sa.ForeignKeyConstraint(['parent'], ['assets.key'], ),
    sa.PrimaryKeyConstraint('child', 'parent', 'role')
    )
    op.create_index(op.f('ix_edges_parent'), 'edges', ['parent'], unique=False)
    op.create_table('run_assets',
    sa.Column('run_id', sa.String(length=40), nullable=False),
    sa.Column('asset_key', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('final', sa.Boolean(), nullable=False),
    sa.Column('export_path', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['asset_key'], ['assets.key'], ),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ),
    sa.PrimaryKeyConstraint('run_id', 'asset_key')
    )
    op.create_table('scores',
    sa.Column('decision', sa.String(length=32), nullable=False),
    sa.Column('draft_key', sa.String(length=32), nullable=False),
    sa.Column('prompt_score', sa.Float(), nullable=False),
    sa.Column('moodboard_score', sa.Float(), nullable=False),
    sa.Column('diversity_penalty', sa.Float(), nullable=False),
    sa.Column('total', sa.Float(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('kept', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['draft_key'], ['assets.key'], ),
    sa.PrimaryKeyConstraint('decision', 'draft_key')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('scores')
    op.drop_table('run_assets')
    op.drop_index(op.f('ix_edges_parent'), table_name='edges')
    op.drop_table('edges')
    op.drop_index(op.f('ix_stage_runs_run_id'), table_name='stage_runs')
    op.drop_table('stage_runs')
    op.drop_index(op.f('ix_assets_stage'), table_name='assets')
    op.drop_index(op.f('ix_assets_sha256'), table_name='assets')
    op.drop_index(op.f('ix_assets_deliverable'), table_name='assets')
    op.drop_index(op.f('ix_assets_campaign'), table_name='assets')
    op.drop_table('assets')
    op.drop_index(op.f('ix_runs_campaign'), table_name='runs')
    op.drop_table('runs')
