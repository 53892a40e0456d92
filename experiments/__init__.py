"""The experiments that test the paper's claims: the 2D toy driver (`python -m experiments.toy`), the digits
testbed and its driver (`python -m experiments.digits`), and the evidence rules both are judged by."""
