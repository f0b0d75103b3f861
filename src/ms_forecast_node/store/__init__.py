"""The node's durable state: one SQLite file (WAL) beside the instance files."""

from ms_forecast_node.store.database import Database, JobState, OutboxState

__all__ = ["Database", "JobState", "OutboxState"]
