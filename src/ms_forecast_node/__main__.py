"""``python -m ms_forecast_node`` runs the command line."""

from ms_forecast_node.cli import main

main()
