"""The spine that every entry point shares: load → preprocess → forecast → report."""
