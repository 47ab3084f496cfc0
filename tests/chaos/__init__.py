"""Tests of the chaos harness (chaos/): fault proxy and the chaos run."""
