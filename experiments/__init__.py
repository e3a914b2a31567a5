"""Experiment entry point, sweeps, reproduction drivers and plots."""
