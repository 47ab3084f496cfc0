"""Fault injection (network proxy, process kills) and the delivery checker for chaos runs."""
