"""`shoal bench`: measured, side-by-side numbers against the peers, reported as ratios."""
