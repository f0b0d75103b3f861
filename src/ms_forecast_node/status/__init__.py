"""Operations: the web status page, JSON logs and data retention.

``start_status_server`` serves the status page (overview, configuration, per-study results,
Prometheus metrics, health) from the node's database and metrics registry.
"""

from ms_forecast_node.status.server import StatusServer, start_status_server

__all__ = ["StatusServer", "start_status_server"]
