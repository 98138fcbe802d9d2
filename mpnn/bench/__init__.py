"""``python -m mpnn.bench``: how fast mpnn trains, side by side with PyTorch.

    runners     what is timed: mpnn's training step (the one ``mpnn.train``
                runs, the gather of each batch's rows included) and the same
                model in PyTorch, both stepping through the rows of
                ``mpnn.train``'s synthetic dataset in the trainer's order
    measure     how it is timed: interleaved blocks, medians and ranges over
                repeats, paired ratios, the machine's float32 GEMM rate, FLOP
                counts of a step
    dp_worker   the data-parallel measurement, a program of its own run under
                ``mpirun -n 2 python -m mpnn.bench.dp_worker``
    report      the table, the JSON file, the targets
    __main__    the command line: parse, measure, report

Nothing is imported here, so ``python -m mpnn.bench.dp_worker`` starts light.
"""
