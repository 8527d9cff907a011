"""Closed-loop driving in the synthetic world (``drivejepa drive``): simulator.py runs a scenario with a driver,
drivers.py holds the driver protocol and the drivers, metrics.py scores runs, runner.py runs scenarios with Ray."""
