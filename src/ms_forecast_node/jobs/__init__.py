"""Jobs: the persisted state machine that runs the pipeline for each study version."""
