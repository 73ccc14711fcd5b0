"""Mixed precision: layer sensitivity, the collapse guard and the automatic search."""
