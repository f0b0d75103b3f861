"""Treatment-conditioned NET2 forecasting: model, sampling, aggregation, evaluation."""
