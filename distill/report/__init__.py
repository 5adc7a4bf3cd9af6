"""The end of a run and of a sweep: summary.json, the printed table, the comparison (Pareto), plots, the objective."""
