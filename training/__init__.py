"""Training and evaluation of the emotion models (reads datasets; never imported by serve/)."""
