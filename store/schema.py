"""SQLAlchemy 2.0 schema of the lineage store (SQLite by default; any SQLAlchemy URL later)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    campaign: Mapped[str] = mapped_column(String(64), index=True)
    brief_path: Mapped[str] = mapped_column(Text)
    brief_sha256: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # running | completed | failed | awaiting review
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    info: Mapped[dict] = mapped_column(JSON, default=dict)  # versions, device, pid/host, model calls, phase seconds


class Asset(Base):
    """One file atelier produced or ingested. ``key`` is the recipe hash; ``sha256`` the file's bytes."""

    __tablename__ = "assets"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # image | mask | embedding
    campaign: Mapped[str] = mapped_column(String(64), index=True)
    deliverable: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the store's home
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    params: Mapped[dict] = mapped_column(JSON)
    model: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))  # the run that computed it
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Edge(Base):
    __tablename__ = "edges"
    child: Mapped[str] = mapped_column(ForeignKey("assets.key"), primary_key=True)
    parent: Mapped[str] = mapped_column(ForeignKey("assets.key"), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)  # source | style-ref | mask | init
    position: Mapped[int] = mapped_column(Integer, default=0)


class RunAsset(Base):
    """Which assets a run used, whether it computed or reused each, and which are its finals."""

    __tablename__ = "run_assets"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    asset_key: Mapped[str] = mapped_column(ForeignKey("assets.key"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # computed | reused
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    export_path: Mapped[str | None] = mapped_column(Text, nullable=True)


class Score(Base):
    """Every draft's CLIP scores within one selection decision, and whether it was kept."""

    __tablename__ = "scores"
    decision: Mapped[str] = mapped_column(String(32), primary_key=True)
    draft_key: Mapped[str] = mapped_column(ForeignKey("assets.key"), primary_key=True)
    prompt_score: Mapped[float] = mapped_column(Float)
    moodboard_score: Mapped[float] = mapped_column(Float)
    diversity_penalty: Mapped[float] = mapped_column(Float)
    total: Mapped[float] = mapped_column(Float)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1 = best; None when not kept
    kept: Mapped[bool] = mapped_column(Boolean)


class StageRun(Base):
    """One stage execution within a run: wall time and how many assets it computed / reused."""

    __tablename__ = "stage_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    deliverable: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stage: Mapped[str] = mapped_column(String(32))
    seconds: Mapped[float] = mapped_column(Float)
    computed: Mapped[int] = mapped_column(Integer)
    reused: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(16))


class Gate(Base):
    """A selection a run stopped at for a person's decision (``review:``); ``decision`` is its key."""

    __tablename__ = "gates"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    decision: Mapped[str] = mapped_column(String(32), primary_key=True, index=True)  # the CLIP decision's key
    deliverable: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    candidates: Mapped[list] = mapped_column(JSON)  # candidate keys, in the order a reviewer numbers them (1..N)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Review(Base):
    """A person's decision at a gate: which candidates to keep (in order), reject, star; by whom, why.
    The latest review of a decision is the one that counts; earlier ones stay as history."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    decision: Mapped[str] = mapped_column(String(32), index=True)
    deliverable: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    kept: Mapped[list] = mapped_column(JSON)  # candidate keys, in the person's order
    rejected: Mapped[list] = mapped_column(JSON)
    stars: Mapped[dict] = mapped_column(JSON)  # candidate key -> 1..5
    note: Mapped[str] = mapped_column(Text, default="")
    by: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the run it was given for
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Rating(Base):
    """Stars (1-5) or a reject on any asset, across runs; the latest rating of an asset counts."""

    __tablename__ = "ratings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    asset_key: Mapped[str] = mapped_column(ForeignKey("assets.key"), index=True)
    stars: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rejected: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str] = mapped_column(Text, default="")
    by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
