"""Tests of the agent wing (relay/agent/): publishing, commands, crashes, partitions,
supervision, hostile input."""
