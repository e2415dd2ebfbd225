"""One module per lifecycle stage: plain typed functions that run without a scheduler."""
