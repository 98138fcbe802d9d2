"""Task parallelism: ``python -m mpnn.sweep`` runs many trainings at once over groups of ranks.

Data and model parallelism split one training; a sweep runs independent ones
side by side (a hyperparameter grid, several seeds), and its problem is load
balancing: trials differ in cost, and a split fixed in advance leaves groups
idle while one works through the long trials.

    spec.py         the TOML spec -> trials (options checked as mpnn.train parses them)
    plan.py         expected costs (FLOPs x rows x epochs), the dynamic (longest first
                    to whichever group is free) and static (round-robin) schedulers, the
                    makespan's lower bound
    coordinate.py   world rank 0 hands out trials between its own training steps
    trial.py        one trial on one group: mpnn.train's engines on the group's
                    communicator, its failure recorded, not the sweep's
    report.py       results.jsonl, the table, the makespan, the curves and Gantt chart
    cli.py          the command line
"""
