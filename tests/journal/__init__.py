"""Tests of the journal (journal/)."""
