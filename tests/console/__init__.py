"""Tests of the console wing (relay/console/): the fleet model, consoles against real agents."""
