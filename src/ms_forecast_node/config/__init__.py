"""The node's configuration: one YAML file, validated, with environment overrides."""

from ms_forecast_node.config.settings import (
    DestinationConfig,
    NodeConfig,
    PeerConfig,
    TLSConfig,
    load_config,
)

__all__ = ["DestinationConfig", "NodeConfig", "PeerConfig", "TLSConfig", "load_config"]
